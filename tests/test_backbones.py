import pytest
import torch

from diffseg_utils import WeightsNotAvailableError, adm_blocks, adm_output_block, list_backbones, load_backbone
from diffseg_utils.backbones import first_tensor


@pytest.mark.parametrize("which", ["sd_tiny", "ddpm_tiny"])
def test_backbone_basics(which, request):
    bb = request.getfixturevalue(which)
    x = torch.rand(2, 3, bb.resolution, bb.resolution) * 2 - 1
    z = bb.encode(x)
    assert z.shape == (2, bb.latent_channels, bb.latent_resolution, bb.latent_resolution)
    assert bb.decode(z).shape == x.shape
    if bb.kind == "pixel":
        assert torch.equal(z, x) and bb.encode_prompt(["a cat"]) is None
    else:
        emb = bb.encode_prompt(["", "a photo of a star"]).embeds
        assert emb.shape[:2] == (2, bb.tokenizer.model_max_length)
        assert not torch.allclose(emb[0], emb[1])
    eps = bb.predict(z, 10)
    assert eps.shape == z.shape and eps.dtype == bb.dtype


def test_kinds(sd_tiny, ddpm_tiny):
    assert sd_tiny.kind == "latent" and sd_tiny.vae_scale_factor == 8 and sd_tiny.resolution == 64
    assert ddpm_tiny.kind == "pixel" and ddpm_tiny.vae_scale_factor == 1 and ddpm_tiny.resolution == 64


def test_add_noise_matches_formula(sd_tiny):
    x0, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ab = sd_tiny.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sd_tiny.add_noise(x0, t, n), ab.sqrt() * x0 + (1 - ab).sqrt() * n)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        sd_tiny.add_noise(x0, 1000, n)


@pytest.mark.parametrize("which", ["sd_tiny", "ddpm_tiny"])
def test_blocks_match_a_forward_pass(which, request):
    bb = request.getfixturevalue(which)
    blocks = bb.blocks()
    assert any(k.startswith("up_blocks") for k in blocks) and "mid_block" in blocks
    seen = {}

    def hook(name):
        def fn(_m, _i, out):
            seen.setdefault(name, tuple(first_tensor(out).shape))  # returns None: output untouched
        return fn

    hs = [bb.denoiser.get_submodule(n).register_forward_hook(hook(n)) for n in blocks]
    try:
        x = torch.randn(3, bb.latent_channels, bb.latent_resolution, bb.latent_resolution)
        bb.predict(x, 5)
    finally:
        for h in hs:
            h.remove()
    for name, info in blocks.items():
        assert bb.denoiser.get_submodule(name) is info.module
        assert seen[name] == (3, info.channels, *info.resolution), name
    kinds = {b.kind for b in blocks.values()}
    assert {"block", "resnet", "upsampler", "downsampler"} <= kinds
    assert "attention" in kinds


def test_adm_mapping_tiny(ddpm_tiny):
    unet = ddpm_tiny.denoiser
    assert adm_blocks(unet, [0, 2, 3, 5, 6, 8, 12]) == [
        "up_blocks.0.resnets.0", "up_blocks.0.upsamplers.0", "up_blocks.1.attentions.0", "up_blocks.1.upsamplers.0",
        "up_blocks.2.resnets.0", "up_blocks.2.upsamplers.0", "up_blocks.4.resnets.0"]
    assert adm_output_block(unet, 17) == "up_blocks.5.resnets.2"  # last block has no upsampler
    with pytest.raises(ValueError, match="valid 0..17"):
        adm_output_block(unet, 18)


@pytest.mark.slow
def test_adm_mapping_full_size_ddpm_gives_ddpmseg_dims(ddpm256_full):
    """DDPM-Seg's blocks {5,6,7,8,12} on the google DDPM-256 topology give 1408 ch per t (4224 for 3 t)."""
    names = adm_blocks(ddpm256_full.denoiser, [5, 6, 7, 8, 12])
    b = ddpm256_full.blocks()  # resolutions and channels from a real dry run at 256
    assert [b[n].resolution[0] for n in names] == [32, 32, 32, 64, 128]
    assert sum(b[n].channels for n in names) * 3 == 4224


def test_registry_and_offline_errors(tmp_path, monkeypatch):
    reg = list_backbones()
    assert {"toy", "sd-1.5", "sd-2.1-base", "ddpm-bedroom", "ddpm-cat", "ddpm-celebahq"} <= set(reg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(WeightsNotAvailableError) as e:
        load_backbone("sd-1.5")
    msg = str(e.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "download" in msg and "local directory" in msg
    with pytest.raises(WeightsNotAvailableError, match="no such directory"):
        load_backbone(str(tmp_path / "nowhere"))


def test_missing_local_directory_says_so_and_lists_layouts(tmp_path, monkeypatch):
    """A local path that does not exist is not a hub id: no `huggingface-cli download /that/path` advice."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for source in (str(tmp_path / "models" / "ddpm"), "models/ddpm", "./ddpm"):
        with pytest.raises(WeightsNotAvailableError) as e:
            load_backbone(source, device="cpu", allow_download=False)
        msg = str(e.value)
        assert "does not exist" in msg and "huggingface-cli" not in msg, source
        assert "model_index.json" in msg and "config.json" in msg and ".pt" in msg, source
        if source != "./ddpm":
            assert f"nearest existing folder is {tmp_path / 'models'}" in msg, source
    (tmp_path / "models" / "notes.txt").write_text("x")
    with pytest.raises(WeightsNotAvailableError, match="is a file, not a directory"):
        load_backbone("models/notes.txt", device="cpu", allow_download=False)


def test_corrupt_directory_gives_clear_error(tmp_path, sd_tiny_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(WeightsNotAvailableError, match="not available offline"):
        load_backbone(str(broken))


def test_hooks_left_nothing_behind(sd_tiny):
    sd_tiny.blocks()
    for n, info in sd_tiny.blocks().items():
        assert not info.module._forward_hooks, n
