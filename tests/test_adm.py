"""ADM (openai guided-diffusion) checkpoints -> diffusers UNet2DModel.

The manifests in tests/data list the exact parameter names and shapes of the official
``UNetModel`` (generated once from openai/guided-diffusion outside this repo; the commit is in
each file's "source"). Weights here are random: real checkpoints are not needed. Numerical
equality with the official code on random weights was checked outside the repo (see adm.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffseg_utils import adm_blocks, load_backbone
from diffseg_utils.adm import (ADM_PRESETS, DDPMSEG_FLAGS, adm_config, adm_scheduler, convert_adm_state_dict,
                               load_adm_checkpoint, parse_adm_flags, read_state_dict, resolve_adm_flags)
from diffseg_utils.backbones import Backbone, PixelBackbone
from diffseg_utils.loading import WeightsNotAvailableError
from diffseg_utils.hooks import CaptureOutputs

DATA = Path(__file__).parent / "data"
BLOCKS = [5, 6, 7, 8, 12]  # DDPM-Seg's output_blocks


def _manifest(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def random_state_dict(keys: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the manifest's names and shapes, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in keys:
        t = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            t /= math.sqrt(math.prod(shape[1:]))        # fan-in scaling
        elif name.endswith("weight"):
            t = 1 + 0.1 * t                              # GroupNorm scales
        else:
            t *= 0.1                                     # biases
        sd[name] = t
    return sd


@pytest.fixture(scope="module")
def small():
    """The small ADM (DDPM-Seg's layout with one level fewer: 32 px, 32 ch, attention at the 3 coarsest levels)."""
    cfg = _manifest("adm_small_manifest.json")["configs"]["small"]
    sd = random_state_dict(cfg["keys"])
    return cfg, sd, convert_adm_state_dict(sd, cfg["flags"])


@pytest.fixture(scope="module")
def adm256():
    """DDPM-Seg's 256 px ADM (552.8 M parameters) on random weights, converted."""
    m = _manifest("adm_256_manifest.json")
    sd = random_state_dict(m["keys"])
    return m, sd, convert_adm_state_dict(sd, m["flags"])


# ---------------------------------------------------------------- our own reference of ADM's layers
def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """ADM's sinusoidal embedding: [cos, sin] of t * 10000^(-k / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def ref_resblock(sd, p, x, emb, up=False, down=False):
    """ADM ResBlock with scale-shift norm: norm-SiLU-(resample)-conv, FiLM by the embedding, norm-SiLU-conv, skip."""
    h = F.silu(F.group_norm(x, 32, sd[f"{p}.in_layers.0.weight"], sd[f"{p}.in_layers.0.bias"]))
    if up:
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    scale, shift = e.chunk(2, dim=1)
    h = F.group_norm(h, 32, sd[f"{p}.out_layers.0.weight"], sd[f"{p}.out_layers.0.bias"]) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def ref_attention(sd, p, x, head_dim):
    """ADM AttentionBlock, legacy order: the fused qkv rows are [q, k, v] *within* each head."""
    B, C, H, W = x.shape
    h = F.group_norm(x.reshape(B, C, H * W), 32, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"])
    qkv = F.conv1d(h, sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])                  # (B, 3C, T)
    q, k, v = qkv.reshape(B * (C // head_dim), 3 * head_dim, H * W).split(head_dim, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(head_dim), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, H * W)
    return x + F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"]).reshape(B, C, H, W)


# ---------------------------------------------------------------- small config: mapping and semantics
def test_small_every_key_consumed_and_forward_runs(small):
    cfg, sd, unet = small
    assert sum(p.numel() for p in unet.parameters()) == cfg["num_params"] == sum(v.numel() for v in sd.values())
    assert not any(p.is_meta for p in unet.parameters())
    assert torch.equal(unet.conv_in.weight, sd["input_blocks.0.0.weight"])
    assert torch.equal(unet.conv_out.weight, sd["out.2.weight"]) and unet.config.out_channels == 6
    out = unet(torch.randn(2, 3, 32, 32), torch.tensor([50, 250])).sample
    assert out.shape == (2, 6, 32, 32) and torch.isfinite(out).all()


def test_small_layers_match_adm_semantics(small):
    """Time embedding, res blocks (plain, skip-conv, down, up) and attention (encoder, middle,
    decoder) of the converted model equal our own reference of ADM's layers on the ADM weights."""
    cfg, sd, unet = small
    torch.manual_seed(0)
    t = torch.tensor([3, 700])
    h = F.linear(ref_timestep_embedding(t, 32), sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb_ref = F.linear(F.silu(h), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    emb = unet.time_embedding(unet.time_proj(t))
    torch.testing.assert_close(emb, emb_ref)
    d = cfg["flags"]["num_head_channels"]
    cases = [  # (ADM module, diffusers module, input channels, side, kind)
        ("input_blocks.1.0", "down_blocks.0.resnets.0", 32, 16, {}),
        ("input_blocks.7.0", "down_blocks.2.resnets.0", 32, 8, {}),                 # 32 -> 64: skip conv
        ("input_blocks.3.0", "down_blocks.0.downsamplers.0", 32, 16, {"down": True}),
        ("output_blocks.2.2", "up_blocks.0.upsamplers.0", 128, 2, {"up": True}),
        ("output_blocks.5.0", "up_blocks.1.resnets.2", 128, 4, {}),                 # 64 + 64 -> 64
        ("input_blocks.7.1", "down_blocks.2.attentions.0", 64, 8, "attn"),
        ("middle_block.1", "mid_block.attentions.0", 128, 2, "attn"),
        ("output_blocks.5.1", "up_blocks.1.attentions.2", 64, 4, "attn"),
    ]
    with torch.no_grad():
        for adm, dif, c, s, kind in cases:
            x = torch.randn(2, c, s, s)
            mod = unet.get_submodule(dif)
            if kind == "attn":
                torch.testing.assert_close(mod(x), ref_attention(sd, adm, x, d), msg=adm)
            else:
                torch.testing.assert_close(mod(x, emb), ref_resblock(sd, adm, x, emb, **kind), msg=adm)


def test_small_ddpmseg_blocks_and_backbone_features(small, tmp_path):
    cfg, sd, unet = small
    names = adm_blocks(unet, BLOCKS)
    assert names == ["up_blocks.1.upsamplers.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1",
                     "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    path = tmp_path / "small.pt"
    torch.save(sd, path)
    bb = load_backbone(str(path), device="cpu", adm_flags=cfg["flags"])
    assert isinstance(bb, Backbone) and bb.kind == "pixel" and bb.resolution == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = bb.predict(x, 50)
    assert eps.shape == x.shape  # epsilon only: ADM's variance channels dropped for the Backbone
    torch.testing.assert_close(eps, unet(x, torch.tensor([50, 50])).sample[:, :3])
    assert bb.scheduler.config.variance_type == "fixed_small" and bb.scheduler.config.num_train_timesteps == 1000
    from diffseg_utils.features import extract_features

    fm = extract_features(bb, (x + 1) / 2, BLOCKS, [50, 150, 250], dtype=torch.float32, progress=False)
    assert fm.channels == 3 * (64 + 64 + 64 + 64 + 32)  # the small model's widths at those blocks


def test_variant_flags_convert():
    """Conv resampling, additive time embedding, class labels, new attention order, fixed head count."""
    cfg = _manifest("adm_small_manifest.json")["configs"]["variant"]
    sd = random_state_dict(cfg["keys"], seed=1)
    unet = convert_adm_state_dict(sd, cfg["flags"])
    assert sum(p.numel() for p in unet.parameters()) == cfg["num_params"]
    c = unet.config
    assert c.downsample_type == "conv" and c.resnet_time_scale_shift == "default" and c.num_class_embeds == 1000
    assert c.out_channels == 3 and c.attention_head_dim == 32
    # new order: the fused qkv rows are [all q, all k, all v]
    w = sd["input_blocks.3.1.qkv.weight"][:, :, 0]
    attn = unet.down_blocks[1].attentions[0]
    assert torch.equal(attn.to_k.weight, w[64:128]) and torch.equal(attn.to_v.weight, w[128:])
    out = unet(torch.randn(1, 3, 32, 32), torch.tensor([10]), class_labels=torch.tensor([7])).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert adm_scheduler(cfg["flags"]).config.beta_schedule == "squaredcos_cap_v2"


def test_mismatches_are_listed(small):
    cfg, sd, _ = small
    extra = dict(sd, **{"input_blocks.1.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected \(not consumed\): input_blocks\.1\.0\.extra\.weight"):
        convert_adm_state_dict(extra, cfg["flags"])
    less = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(ValueError, match=r"1 missing: middle_block\.1\.qkv\.weight"):
        convert_adm_state_dict(less, cfg["flags"])
    with pytest.raises(ValueError, match="with other shapes.*expected"):
        convert_adm_state_dict(sd, {**cfg["flags"], "num_channels": 64})
    with pytest.raises(ValueError, match="flags the checkpoint was trained with"):
        convert_adm_state_dict(sd, None)  # DDPM-Seg's 256 flags on the small checkpoint


def test_flags_presets_and_unsupported():
    line = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 "
            "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
    assert resolve_adm_flags(parse_adm_flags(line)) == resolve_adm_flags(DDPMSEG_FLAGS) == resolve_adm_flags("ffhq")
    assert resolve_adm_flags(line) == resolve_adm_flags(None, "checkpoints/ddpm/lsun_cat.pt")
    assert {"lsun_bedroom", "lsun_cat", "lsun_horse", "ffhq"} <= set(ADM_PRESETS)
    cfg = adm_config("lsun_bedroom")
    assert cfg["block_out_channels"] == (256, 256, 512, 512, 1024, 1024) and cfg["out_channels"] == 6
    assert cfg["up_block_types"][:4] == ("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)
    with pytest.raises(ValueError, match="unknown ADM flags.*num_channel"):
        resolve_adm_flags({"num_channel": 256})
    with pytest.raises(ValueError, match="unknown ADM preset"):
        resolve_adm_flags("lsun_church")
    with pytest.raises(ValueError, match="channel_mult"):
        adm_config({**DDPMSEG_FLAGS, "image_size": 512})          # 512 model: channel_mult starts with 0.5
    with pytest.raises(ValueError, match="head widths"):
        adm_config({**DDPMSEG_FLAGS, "num_head_channels": -1, "num_heads": 4})  # 64 / 128 / 256-wide heads


def test_scheduler_is_adms_linear_schedule():
    s = adm_scheduler("ffhq")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6, rtol=0)
    assert s.config.variance_type == "learned_range" and s.config.prediction_type == "epsilon"
    assert adm_scheduler("ffhq", eps_only=True).config.variance_type == "fixed_small"
    s250 = adm_scheduler({**DDPMSEG_FLAGS, "diffusion_steps": 250})   # ADM rescales betas by 1000 / T
    assert math.isclose(s250.config.beta_end, 0.08)


# ---------------------------------------------------------------- loading safety
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "lsun_bedroom.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # proof the file is hostile: unrestricted unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="refusing to load"):
        read_state_dict(path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_adm_checkpoint(path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_backbone(str(path), device="cpu")
    assert not marker.exists()


def test_missing_pt_file(tmp_path):
    with pytest.raises(WeightsNotAvailableError, match="no ADM checkpoint.*download_checkpoint.sh"):
        load_backbone(str(tmp_path / "ffhq.pt"), device="cpu")
    with pytest.raises(ValueError, match="adm_flags only applies"):
        load_backbone(str(tmp_path / "nowhere"), adm_flags="ffhq")


# ---------------------------------------------------------------- DDPM-Seg's 256 px model
def test_256_manifest_every_key_consumed_and_forward_runs(adm256):
    """All 566 official keys (552.8 M parameters) land in the UNet2DModel; a 64 px forward runs."""
    m, sd, unet = adm256
    assert len(m["keys"]) == len(sd) == 566
    assert sum(p.numel() for p in unet.parameters()) == m["num_params"] == 552_814_086
    # the converted parameters are the checkpoint's tensors (or per-head slices of the fused qkv)
    up = unet.up_blocks[1].upsamplers[0]  # ADM output_blocks[5]: res block, attention, up-sampling res block
    assert up.conv1.weight.data_ptr() == sd["output_blocks.5.2.in_layers.2.weight"].data_ptr()
    x = torch.randn(1, 3, 64, 64)  # ADM is convolutional: 64 px keeps the test to seconds
    with torch.no_grad():
        out = unet(x, torch.tensor([50])).sample
    assert out.shape == (1, 6, 64, 64) and torch.isfinite(out).all()


def test_256_ddpmseg_blocks_give_2816_channels_per_timestep(adm256):
    _, _, unet = adm256
    names = adm_blocks(unet, BLOCKS)
    t = torch.tensor([50, 150, 250])
    with CaptureOutputs(unet, names) as cap, torch.no_grad():
        unet(torch.randn(1, 3, 64, 64).expand(3, -1, -1, -1), t)
        shapes = {n: tuple(cap.outputs[n].shape) for n in names}
    chans = [shapes[n][1] for n in names]
    assert chans == [1024, 512, 512, 512, 256] and sum(chans) == 2816
    assert [shapes[n][-1] * 4 for n in names] == [32, 32, 32, 64, 128]  # sides at 256 px input
    assert 3 * sum(chans) == 8448


@pytest.mark.slow
def test_256_backbone_features_at_native_size(adm256, tmp_path):
    """Through a Backbone at 256 px: DDPM-Seg's 8448 feature channels at t = 50, 150, 250."""
    from diffseg_utils.features import extract_features

    m, _, unet = adm256
    bb = PixelBackbone(unet=unet, scheduler=adm_scheduler(m["flags"]), device="cpu", dtype=torch.float32)
    fm = extract_features(bb, torch.rand(1, 3, 256, 256), BLOCKS, [50, 150, 250], progress=False)
    assert fm.channels == 8448
    assert [fm.maps[(50, n)].shape[-1] for n in fm.blocks] == [32, 32, 32, 64, 128]
