"""Every public entry point in bfloat16 on the CPU, on the tiny random models.

For each entry point, the same call runs on a float32 and a bfloat16 copy of the backbone. The
bfloat16 run is watched by :class:`DtypeRecorder` (a ``TorchDispatchMode``: it sees the output of
every aten op) and must

* let the dtype flow through: every convolution / matrix product inside the UNet runs in bfloat16
  (nothing silently upcast to float32 and back), and the outputs have the documented dtype;
* create no float64 tensor anywhere (float64 does not exist on Apple MPS and is slow on GPUs);
  the one exception is :func:`~diffseg_utils.grounding.labelers.weights_fingerprint`, which copies
  each weight to the host on purpose (once per synthesis) — the allow-list below names it;
* give results close to float32 (tolerances of bfloat16's 8-bit mantissa, accumulated through a
  UNet).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffseg_utils import (FewShotSegmenter, choose_places, daam_segment, emerdiff_segment, extract_features,
                           fewshot_miou, load_backbone, probe_grid)
from diffseg_utils.grounding.features import generate_with_features
from diffseg_utils.grounding.labelers import GroundingLabeler, SegmenterLabeler
from diffseg_utils.grounding.module import GroundingModule, class_embeddings
from diffseg_utils.grounding.segmenter import SegmenterOutput
from diffseg_utils.grounding.shards import GroundingShards, synthesize
from diffseg_utils.grounding.train import train_grounding
from diffseg_utils.pixel_classifier import EnsembleConfig
from diffseg_utils.sampling import generate

# where float64 may be created: host-side arithmetic on tensors these functions first copy to the CPU
ALLOWED_FLOAT64 = {
    "labelers.py:weights_fingerprint",  # p.detach().to("cpu", torch.float64), once per synthesis (its docstring)
    "metrics.py:iou_per_class",         # on the (K, K) confusion matrix, which its callers read back to the host
}
HEAVY = {"convolution", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_attention_math", "_softmax"}


def _where() -> str:
    """The innermost diffseg_utils frame of the current Python stack ("file.py:function")."""
    f = sys._getframe(2)
    while f is not None:
        if "diffseg_utils" in f.f_code.co_filename:
            return f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}"
        f = f.f_back
    return "<outside diffseg_utils>"


class DtypeRecorder(TorchDispatchMode):
    """Records where float64 tensors are created (an op with a float64 output and no float64 input, and
    the innermost diffseg_utils function calling it) and the dtypes of heavy ops inside UNet calls."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.float64: list[tuple[str, str]] = []
        self.unet_ops: Counter = Counter()
        self._depth = 0
        self._handles = [unet.register_forward_pre_hook(lambda *_: self._enter()),
                         unet.register_forward_hook(lambda *_: self._leave())]

    def _enter(self):
        self._depth += 1

    def _leave(self):
        self._depth -= 1

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        f64 = lambda tree: any(isinstance(t, torch.Tensor) and t.dtype == torch.float64  # noqa: E731
                               for t in tree_leaves(tree))
        if f64(out) and not f64((args, kwargs)):
            self.float64.append((name, _where()))
        if self._depth and name in HEAVY:
            main = out[0] if isinstance(out, (tuple, list)) else out  # SDPA's 2nd output (logsumexp) is float32
            self.unet_ops[(name, main.dtype)] += 1
        return out

    def check(self, dtype: torch.dtype = torch.bfloat16, unet_ran: bool = True) -> None:
        bad = sorted({(op, w) for op, w in self.float64 if w not in ALLOWED_FLOAT64})
        assert not bad, f"float64 tensors created by (op, our function): {bad}"
        if unet_ran:
            assert self.unet_ops, "the UNet did not run under the recorder"
            other = {k: v for k, v in self.unet_ops.items() if k[1] != dtype}
            assert not other, f"heavy ops inside the UNet not in {dtype}: {other}"


def record(bb):
    return DtypeRecorder(bb.denoiser)


@pytest.fixture(scope="module")
def sd(sd_tiny_dir):
    return {dt: load_backbone(str(sd_tiny_dir), device="cpu", dtype=dt) for dt in (torch.float32, torch.bfloat16)}


@pytest.fixture(scope="module")
def ddpm(ddpm_tiny_dir):
    return {dt: load_backbone(str(ddpm_tiny_dir), device="cpu", dtype=dt) for dt in (torch.float32, torch.bfloat16)}


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Two-region images (left/right halves of different random colours) in [0, 1], and their labels."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    x = torch.zeros(n, 3, size, size)
    x[..., : size // 2], x[..., size // 2:] = a, b
    x = (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    y = np.zeros((n, size, size), dtype=np.int64)
    y[..., size // 2:] = 1
    return x, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def _bare_bf16_error(bb16, bb32, x, blocks, timesteps) -> dict:
    """Relative error of each block's output when the same float32 noised latents go through the bf16 denoiser."""
    z = bb32.encode(bb32.preprocess(x))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for t in timesteps:
        zt = bb32.add_noise(z, t, eps)
        caps = {}
        for bb in (bb16, bb32):
            with bb.capture(blocks) as cap:
                bb.predict(zt.to(bb.dtype), t)
            caps[bb.dtype] = cap.outputs
        out.update({(t, b): _rel(caps[torch.bfloat16][b], caps[torch.float32][b]) for b in blocks})
    return out


def test_recorder_catches_float64_and_upcasts(ddpm):
    """The checks can fail: a float64 op and a float32 UNet are both reported."""
    bb = ddpm[torch.bfloat16]
    with record(bb) as rec:
        torch.ones(3, dtype=torch.float32).double()
    with pytest.raises(AssertionError, match="float64"):
        rec.check(unet_ran=False)
    bb32 = ddpm[torch.float32]
    with record(bb32) as rec:
        bb32.predict(torch.zeros(1, 3, 64, 64), 10)
    with pytest.raises(AssertionError, match="not in torch.bfloat16"):
        rec.check()


@pytest.mark.parametrize("which", ["ddpm", "sd"])
def test_extract_features_bf16(which, ddpm, sd):
    bbs = {"ddpm": ddpm, "sd": sd}[which]
    bb16, bb32 = bbs[torch.bfloat16], bbs[torch.float32]
    blocks = [5, 6, 7, 8] if which == "ddpm" else ["up_blocks.1", "up_blocks.2"]
    x, _ = _images(2)
    ref = extract_features(bb32, x, blocks, [50, 150], dtype=torch.float32, progress=False)
    with record(bb16) as rec:
        got = extract_features(bb16, x, blocks, [50, 150], dtype=torch.bfloat16, progress=False)
    rec.check()
    assert all(m.dtype == torch.bfloat16 for m in got.maps.values())
    bare = _bare_bf16_error(bb16, bb32, x, got.blocks, [50, 150])
    for k in ref.keys:
        # bfloat16's error through a UNet depends on the CPU's kernels: bound the method's error by the bare
        # denoiser's own bf16-vs-fp32 error on the same noised input, measured here on this machine
        assert _rel(got.maps[k], ref.maps[k]) < 3 * bare[k] + 0.01, (k, _rel(got.maps[k], ref.maps[k]), bare[k])
    with record(bb16) as rec:
        s = got.sample(torch.zeros(5, dtype=torch.long), torch.arange(5), torch.arange(5))
    rec.check(unet_ran=False)
    assert s.dtype == torch.float32 and _rel(s, ref.sample(torch.zeros(5, dtype=torch.long), torch.arange(5),
                                                             torch.arange(5))) < 0.05


def test_ddpmseg_bf16(ddpm):
    """FewShotSegmenter fit/predict and fewshot_miou on a bfloat16 backbone: same labels as float32."""
    x, y = _images(3)
    cfg = EnsembleConfig(num_classes=2, max_steps=40)
    out = {}
    for dt, bb in ddpm.items():
        seg = FewShotSegmenter(bb, [6, 7], [50], num_classes=2, config=cfg)
        with record(bb) as rec:
            seg.fit(x[:2], y[:2], progress=False)
            out[dt] = seg.predict(x[2:])
        if dt == torch.bfloat16:
            rec.check()
    a, b = out[torch.bfloat16], out[torch.float32]
    assert a.labels.dtype == torch.int64 and a.uncertainty.dtype == torch.float32
    assert (a.labels == b.labels).float().mean() > 0.9
    feats = {dt: extract_features(bb, x, [6, 7], [50], dtype=torch.bfloat16 if dt == torch.bfloat16 else torch.float32,
                                  progress=False) for dt, bb in ddpm.items()}
    scores = {}
    for dt, f in feats.items():
        with record(ddpm[dt]) as rec:
            scores[dt], _ = fewshot_miou(f.images(slice(0, 2)), y[:2], f.images(slice(2, 3)), y[2:], num_classes=2,
                                         max_pixels=2000)
        if dt == torch.bfloat16:
            rec.check(unet_ran=False)
    assert abs(scores[torch.bfloat16] - scores[torch.float32]) < 0.1


def test_probe_grid_and_choose_places_bf16(ddpm):
    x, y = _images(4)
    tables, choices = {}, {}
    for dt, bb in ddpm.items():
        with record(bb) as rec:
            tables[dt] = probe_grid(bb, x[:2], y[:2], x[2:], y[2:], [6, 7, 8], [50, 150], per_class=200,
                                    progress=False)
            choices[dt] = choose_places(bb, x[:2], y[:2], x[2:], y[2:], timesteps=[50, 150], num_classes=2,
                                        blocks=[6, 7, 8], n_blocks=2, n_timesteps=1, per_class=200, progress=False)
        if dt == torch.bfloat16:
            rec.check()
    assert np.abs(tables[torch.bfloat16].miou - tables[torch.float32].miou).max() < 0.15


def _inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    x, labels = x.float(), labels.reshape(-1)
    return float(sum(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum() for k in labels.unique()))


# Backbone.add_noise computes its coefficients in float32: in bfloat16 abar_1 = 0.99915 rounds to 1 and the
# noise at t = 1 (EmerDiff's t_f) would vanish; these tests failed before that fix.


@pytest.mark.parametrize("t", [1, 50, 281])
def test_add_noise_bf16_keeps_the_noise(sd, t):
    bb16, bb32 = sd[torch.bfloat16], sd[torch.float32]
    g = torch.Generator().manual_seed(0)
    z0, eps = 0.05 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ref = bb32.add_noise(z0, t, eps)
    with record(bb16) as rec:
        got = bb16.add_noise(z0.bfloat16(), t, eps.bfloat16())
    rec.check(unet_ran=False)
    assert got.dtype == torch.bfloat16
    assert _rel(got, ref) < 0.02


def test_emerdiff_bf16(sd):
    from diffseg_utils.attention import ControlledAttnProcessor
    from diffseg_utils.hooks import AttentionProcessors

    x, _ = _images(1)
    q_layer = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"  # 8x8 positions on the tiny model
    out = {}
    for dt, bb in sd.items():
        with record(bb) as rec:
            out[dt] = emerdiff_segment(bb, x, 3, num_steps=3, kmeans_restarts=10, query_layer=q_layer,
                                       progress=False)
        if dt == torch.bfloat16:
            rec.check()
    a, b = out[torch.bfloat16], out[torch.float32]
    assert a.pixels.shape == b.pixels.shape == (1, 64, 64) and a.pixels.dtype == torch.int64
    assert a.diffs.dtype == torch.float32 and torch.isfinite(a.diffs).all()
    # the float32 queries k-means clusters (t_f = 1: the noise draw barely matters) ...
    bb = sd[torch.float32]
    z0 = bb.encode(bb.preprocess(x))
    cap = ControlledAttnProcessor(capture_query=True)
    with AttentionProcessors(bb.denoiser, {q_layer: cap}):
        bb.predict(bb.add_noise(z0, 1, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))), 1)
    q = cap.query[0]
    # ... are clustered as well by the bf16 run's segments as by the float32 run's (random weights give
    # no clear clusters, so the labels themselves may differ; their quality may not)
    assert _inertia(q, a.low_res) < 1.1 * _inertia(q, b.low_res)


def test_generate_and_daam_bf16(sd):
    prompts, words = ["a photograph of a star", "a photograph of a ring"], ["star", "ring"]
    out, imgs = {}, {}
    for dt, bb in sd.items():
        with record(bb) as rec:
            imgs[dt] = generate(bb, prompts, num_steps=3, guidance_scale=7.5)
            out[dt] = daam_segment(bb, prompts, words, num_steps=3, guidance_scale=7.5)
        if dt == torch.bfloat16:
            rec.check()
    assert imgs[torch.bfloat16].dtype == torch.bfloat16
    assert (imgs[torch.bfloat16].float() - imgs[torch.float32]).abs().mean() < 0.05
    a, b = out[torch.bfloat16], out[torch.float32]
    assert a.heatmaps.dtype == torch.float32 and a.masks.dtype == torch.bool
    assert (a.heatmaps - b.heatmaps).abs().mean() < 0.05


class _Halves:
    """A stand-in segmenter: class j is the left (j even) or right (j odd) half of the image."""

    name = "halves"

    def __init__(self, names):
        self.class_names = tuple(names)

    def __call__(self, images):
        n, _, h, w = images.shape
        m = torch.zeros(n, len(self.class_names), h, w, dtype=torch.bool, device=images.device)
        for j in range(len(self.class_names)):
            if j % 2:
                m[:, j, :, w // 2:] = True
            else:
                m[:, j, :, : w // 2] = True
        return SegmenterOutput(m, torch.ones(n, len(self.class_names), device=images.device), self.class_names)


def test_grounding_bf16(sd, tmp_path):
    """generate_with_features, the module (forward, predict), synthesis with both labelers, training."""
    names = ["star", "ring", "heart"]
    prompts = ["a photograph of a star", "a photograph of a ring and a heart"]
    feats, logits = {}, {}
    torch.manual_seed(0)
    gm = GroundingModule.for_backbone(sd[torch.float32])
    for dt, bb in sd.items():
        with record(bb) as rec:
            # features of the first step: same x_T, so only the UNet arithmetic differs (random weights
            # with guidance 5 amplify bf16 rounding along the sampling trajectory)
            batch = generate_with_features(bb, prompts, num_steps=3, guidance_scale=5.0, feature_step=0)
            q = class_embeddings(bb, names)
            logits[dt] = gm(batch.features, q[None].expand(2, -1, -1))
            gm.predict(batch.features, q[None].expand(2, -1, -1))
        if dt == torch.bfloat16:
            rec.check()
            assert batch.images.dtype == torch.bfloat16
            assert all(f.dtype == torch.float16 for f in batch.features.values())  # the documented storage dtype
        feats[dt] = batch.features
    for r in feats[torch.float32]:
        assert _rel(feats[torch.bfloat16][r], feats[torch.float32][r]) < 0.05, r
    assert _rel(logits[torch.bfloat16], logits[torch.float32]) < 0.05

    bb = sd[torch.bfloat16]
    with record(bb) as rec:
        synthesize(bb, SegmenterLabeler(_Halves(names)), tmp_path / "seg", num_samples=3, class_names=names,
                   shard_size=2, num_steps=2, batch_size=2, progress=False)
        synthesize(bb, GroundingLabeler(bb, gm, names), tmp_path / "gm", num_samples=2, class_names=names,
                   shard_size=2, num_steps=2, batch_size=2, progress=False)
        shards = GroundingShards(tmp_path / "seg")
        hist = train_grounding(gm, shards, class_embeddings(bb, names), steps=3, batch_size=2, progress=False,
                               log_every=3)
        # protocol I: the module and the cross-attention baseline scored against a segmenter on generations
        from diffseg_utils.grounding.protocols import evaluate_on_generations

        res = evaluate_on_generations(bb, gm, _Halves(names), names, names[:2], num_images=2, num_steps=2,
                                      batch_size=2, progress=False)
    rec.check()
    assert len(shards) == 3 and np.isfinite(hist[-1]["loss"])
    assert set(res.table()) == {"grounding", "daam"} and sum(res.pairs.values()) > 0
    assert all(0 <= v <= 1 for m in res.iou.values() for v in m.values() if not np.isnan(v))
    gm.save(tmp_path / "gm.pt")
    back = GroundingModule.load(tmp_path / "gm.pt", bb)
    assert next(back.parameters()).dtype == torch.float32  # the module trains in float32 whatever the backbone


def test_ground_bf16(sd):
    """The one-call grounding entry point."""
    import diffseg_utils.grounding as grounding

    torch.manual_seed(0)
    gm = GroundingModule.for_backbone(sd[torch.float32])
    res = {}
    for dt, bb in sd.items():
        with record(bb) as rec:
            res[dt] = grounding.ground(bb, gm, "a photograph of a star", ["star", "ring"], num_steps=2)
        if dt == torch.bfloat16:
            rec.check()
    assert res[torch.bfloat16].scores.dtype == torch.float32
    assert (res[torch.bfloat16].scores - res[torch.float32].scores).abs().mean() < 0.05
