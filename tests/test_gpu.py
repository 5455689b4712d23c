"""Every entry point in float16 on CUDA at the full SD 1.5, google DDPM-256 and ADM-256 topologies
(random weights), with ``torch.cuda.set_sync_debug_mode("error")`` inside the hot loops.

    pytest -m gpu tests/test_gpu.py          # skipped where CUDA is not available

Hot loops are guarded by :class:`SyncGuard`: the call is first run once unguarded to count how often
the loop body runs (UNet calls, ensemble steps, ...), then again with the sync check on from the
2nd iteration to the end of the last one. Setup before the loop and the single read-back after it
are left out; everything between (the model calls, sampler steps, hooks, batch gathering) must not
make the host wait for the device: no ``.item()`` / ``int()`` / ``.cpu()`` / ``.tolist()`` on device
tensors, no Python ``if`` on them, no blocking host-to-device copies (``torch.tensor(..., device=cuda)``
of host data, ``.to(cuda)`` of a pageable CPU tensor: use ``torch.full(..., device=...)`` or
on-device arithmetic).

Each test also records, with a ``TorchDispatchMode``, every float64 tensor created on the device.

``DIFFSEG_GPU_SELFTEST=1`` runs the same tests on the CPU in bfloat16 with the tiny topologies and
no sync check: a quick way to check the tests themselves where there is no GPU.
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SELFTEST = os.environ.get("DIFFSEG_GPU_SELFTEST") == "1"
HAVE_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (HAVE_CUDA or SELFTEST), reason="needs CUDA (run with `pytest -m gpu` on a GPU)")]

DEVICE = torch.device("cuda" if HAVE_CUDA and not SELFTEST else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.bfloat16
TINY = DEVICE.type != "cuda"


# ---------------------------------------------------------------------------- checks
class DeviceFloat64(TorchDispatchMode):
    """Records ops that create float64 tensors on the device (host float64 is allowed)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                self.found.append(func.overloadpacket.__name__)
        return out


def _set_sync_mode(mode: str | int) -> None:
    if DEVICE.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


class SyncGuard:
    """Sync debug mode "error" from the start of the ``first``-th call of a loop body to the end of its
    ``last``-th; with ``period``, the window repeats every ``period`` calls (one generation per batch).

    The loop body is a module (forward pre/post hooks) or a module-level function (patched with
    ``monkeypatch``). ``count`` is the number of calls seen.
    """

    def __init__(self, last: int, first: int = 2, period: int | None = None):
        self.first, self.last, self.period = first, last, period
        self.count = 0

    def _pos(self) -> int:
        return (self.count - 1) % self.period + 1 if self.period else self.count

    def before(self) -> None:
        self.count += 1
        if self._pos() == self.first:
            _set_sync_mode("error")

    def after(self) -> None:
        if self._pos() == self.last:
            _set_sync_mode(0)

    def on_module(self, module: torch.nn.Module) -> "SyncGuard":
        self._handles = [module.register_forward_pre_hook(lambda *_: self.before()),
                         module.register_forward_hook(lambda *_: self.after())]
        return self

    def on_function(self, monkeypatch, owner, name: str) -> "SyncGuard":
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            self.before()
            try:
                return fn(*a, **k)
            finally:
                self.after()

        monkeypatch.setattr(owner, name, wrapped)
        return self

    def close(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        _set_sync_mode(0)


def count_calls(module: torch.nn.Module, fn) -> int:
    n = [0]
    h = module.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    try:
        fn()
    finally:
        h.remove()
    return n[0]


def guarded(module: torch.nn.Module, fn, period: int | None = None):
    """Run ``fn`` once to count ``module``'s calls, then again under a :class:`SyncGuard` and a float64
    recorder; returns the second run's result."""
    calls = count_calls(module, fn) if period is None else period  # with a period: one (guarded) run
    assert calls >= 2, f"the loop ran {calls} time(s); the test needs at least 2 iterations to guard"
    g = SyncGuard(last=calls, period=period).on_module(module)
    try:
        with DeviceFloat64() as rec:
            out = fn()
    finally:
        g.close()
    assert g.count >= 2
    assert not rec.found, f"float64 tensors created on {DEVICE}: {sorted(set(rec.found))}"
    return out


# ---------------------------------------------------------------------------- backbones
def _place(bb):
    bb.blocks()  # dry run outside the guarded loops
    return bb


@pytest.fixture(scope="module")
def sd15():
    """SD 1.5: the full UNet, the full VAE, a 12-layer 768-wide CLIP text tower on our tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffseg_utils.backbones import SDBackbone
    from topologies import sd15_text_config, sd15_unet_config, sd15_vae_config
    from diffseg_utils.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(), model_max_length=16 if TINY else 77)
    text = CLIPTextModel(CLIPTextConfig(**sd15_text_config(TINY, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False)
    return _place(SDBackbone(unet=UNet2DConditionModel(**sd15_unet_config(TINY)), vae=AutoencoderKL(**sd15_vae_config(TINY)),
                           text_encoder=text, tokenizer=tok, scheduler=sched, device=DEVICE, dtype=DTYPE))


@pytest.fixture(scope="module")
def ddpm256():
    """google/ddpm-ema-*-256's UNet2DModel topology."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffseg_utils.backbones import PixelBackbone
    from topologies import ddpm256_unet_config, ddpm_scheduler_config

    torch.manual_seed(0)
    return _place(PixelBackbone(unet=UNet2DModel(**ddpm256_unet_config(TINY)), scheduler=DDPMScheduler(**ddpm_scheduler_config()),
                           device=DEVICE, dtype=DTYPE))


@pytest.fixture(scope="module")
def adm256():
    """DDPM-Seg's ADM-256 (guided-diffusion flags of its checkpoints): 8448-dim features."""
    from diffusers import UNet2DModel

    from diffseg_utils.adm import adm_config, adm_scheduler
    from diffseg_utils.backbones import PixelBackbone
    from topologies import ddpm256_unet_config

    torch.manual_seed(0)
    cfg = ddpm256_unet_config(tiny=True) if TINY else adm_config("ddpm-seg", eps_only=True)
    return _place(PixelBackbone(unet=UNet2DModel(**cfg), scheduler=adm_scheduler("ddpm-seg", eps_only=True), device=DEVICE,
                           dtype=DTYPE))


def _images(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = np.zeros((n, size, size), dtype=np.int64)
    y[..., size // 2:] = 1
    y[..., : size // 4, :] = 2
    return x, y


BLOCKS, TIMESTEPS = [5, 6, 7, 8, 12], [50, 150, 250]


# ---------------------------------------------------------------------------- DDPM-Seg
@pytest.fixture(scope="module")
def adm_features(adm256):
    from diffseg_utils import extract_features

    x, y = _images(3, adm256.resolution)
    fm = guarded(adm256.denoiser, lambda: extract_features(adm256, x, BLOCKS, TIMESTEPS, batch_size=1, progress=False))
    return fm, y


def test_extract_features_adm_8448(adm_features):
    fm, _ = adm_features
    assert fm.channels == (8448 if not TINY else fm.channels) and fm.num_images == 3
    assert all(m.dtype == torch.float16 and m.device.type == DEVICE.type for m in fm.maps.values())
    assert all(torch.isfinite(m).all() for m in fm.maps.values())


def test_extract_features_google_ddpm_4224(ddpm256):
    from diffseg_utils import extract_features

    x, _ = _images(2, ddpm256.resolution)
    fm = guarded(ddpm256.denoiser, lambda: extract_features(ddpm256, x, BLOCKS, TIMESTEPS, batch_size=1, progress=False))
    assert fm.channels == (4224 if not TINY else fm.channels)
    assert all(torch.isfinite(m).all() for m in fm.maps.values())


def _guard_function(monkeypatch, owner, name: str, run) -> object:
    """Count the calls of ``owner.name`` in a first run, then guard them in a second."""
    seen = SyncGuard(last=10**9)
    seen.on_function(monkeypatch, owner, name)
    _set_sync_mode(0)
    seen.first = 10**9  # counting only
    run()
    monkeypatch.undo()
    calls = seen.count
    assert calls >= 2, f"{name} ran {calls} time(s); need at least 2 to guard the loop"
    g = SyncGuard(last=calls).on_function(monkeypatch, owner, name)
    try:
        with DeviceFloat64() as rec:
            out = run()
    finally:
        g.close()
        monkeypatch.undo()
    assert not rec.found, f"float64 tensors created on {DEVICE}: {sorted(set(rec.found))}"
    return out


def test_ddpmseg_fit_predict(adm_features, monkeypatch):
    """The ensemble's training steps and prediction chunks on the 8448-dim features, sync-free."""
    from diffseg_utils import FewShotSegmenter, SegmentationResult, pixel_classifier
    from diffseg_utils.pixel_classifier import EnsembleConfig

    fm, y = adm_features
    tr, te = fm.images(slice(0, 2)), fm.images(slice(2, 3))
    cfg = EnsembleConfig(num_classes=3, max_steps=30)

    def fit():
        # labels on the device, as a user whose data loader put them there passes them
        return FewShotSegmenter(None, fm.blocks, fm.timesteps, 3, config=cfg).fit(None, torch.from_numpy(y[:2]).to(DEVICE), features=tr,
                                                                                  progress=False)

    seg = _guard_function(monkeypatch, pixel_classifier, "_train_step", fit)
    assert seg.ensemble.device.type == DEVICE.type  # follows the features
    # 256² = 4 chunks of 16384 pixels (the tiny self-test's 64² needs smaller chunks to loop)
    predict = (lambda: seg.predict(features=te)) if not TINY else (
        lambda: SegmentationResult(*seg.ensemble.predict(te, chunk=1024)))
    res = _guard_function(monkeypatch, pixel_classifier, "vote_and_uncertainty", predict)
    assert res.labels.shape == y[2:].shape and res.labels.device.type == DEVICE.type
    assert torch.isfinite(res.uncertainty).all()


def test_fewshot_miou_probe_grid_choose_places(ddpm256):
    from diffseg_utils import choose_places, extract_features, fewshot_miou, probe_grid
    from diffseg_utils.selection import decoder_blocks

    x, y = _images(4, ddpm256.resolution)
    blocks = decoder_blocks(ddpm256)[:4]
    with DeviceFloat64() as rec:
        fm = extract_features(ddpm256, x, blocks, [50, 150], progress=False)
        score, res = fewshot_miou(fm.images(slice(0, 2)), y[:2], fm.images(slice(2, 4)), y[2:], num_classes=3,
                                  max_pixels=4096)
        table = probe_grid(train_labels=y[:2], test_labels=y[2:], train_features=fm.images(slice(0, 2)),
                           test_features=fm.images(slice(2, 4)), per_class=500, progress=False)
        choice = choose_places(train_labels=y[:2], val_labels=y[2:], timesteps=[50, 150], num_classes=3,
                               train_features=fm.images(slice(0, 2)), val_features=fm.images(slice(2, 4)),
                               per_class=500, progress=False)
    assert not rec.found, f"float64 tensors created on {DEVICE}: {sorted(set(rec.found))}"
    assert 0 <= score <= 1 and np.isfinite(table.miou).all() and choice.best_block in blocks


# ---------------------------------------------------------------------------- EmerDiff, DAAM, grounding at 512²
@pytest.mark.parametrize("K", [10, 40])
def test_emerdiff_sd15(sd15, K):
    from diffseg_utils import emerdiff_segment

    x, _ = _images(1, sd15.resolution)
    K = K if not TINY else 3
    steps = 50 if not TINY else 3
    res = guarded(sd15.denoiser, lambda: emerdiff_segment(sd15, x, K, num_steps=steps, progress=False))
    assert res.pixels.shape == (1, sd15.resolution, sd15.resolution)
    assert torch.isfinite(res.diffs).all() and res.diffs.shape[1] == K


def test_generate_and_daam_sd15(sd15):
    from diffseg_utils import daam_segment
    from diffseg_utils.sampling import generate

    steps = 10 if not TINY else 3
    prompts, words = ["a photograph of a star", "a photograph of a ring"], ["star", "ring"]
    imgs = guarded(sd15.denoiser, lambda: generate(sd15, prompts, num_steps=steps, guidance_scale=7.5), period=steps)
    assert imgs.dtype == DTYPE and torch.isfinite(imgs).all()
    out = guarded(sd15.denoiser, lambda: daam_segment(sd15, prompts, words, num_steps=steps, guidance_scale=7.5), period=steps)
    assert out.heatmaps.shape == (2, 1, sd15.resolution, sd15.resolution)
    assert torch.isfinite(out.heatmaps).all()


class _Halves:
    name = "halves"

    def __init__(self, names):
        self.class_names = tuple(names)

    def __call__(self, images):
        from diffseg_utils.grounding.segmenter import SegmenterOutput

        n, _, h, w = images.shape
        m = torch.zeros(n, len(self.class_names), h, w, dtype=torch.bool, device=images.device)
        for j in range(len(self.class_names)):
            m[:, j, :, (w // 2) * (j % 2):(w // 2) * (j % 2 + 1)] = True
        return SegmenterOutput(m, torch.ones(n, len(self.class_names), device=images.device), self.class_names)


def test_grounding_sd15(sd15, tmp_path):
    """generate_with_features, the module, synthesis (both labelers), training: sync-free loops."""
    from diffseg_utils.grounding.features import generate_with_features
    from diffseg_utils.grounding.labelers import GroundingLabeler, SegmenterLabeler
    from diffseg_utils.grounding.module import GroundingModule, class_embeddings
    from diffseg_utils.grounding.shards import GroundingShards, synthesize
    from diffseg_utils.grounding.train import train_grounding

    steps = 10 if not TINY else 3
    names = ["star", "ring", "heart"]
    gm = GroundingModule.for_backbone(sd15)
    batch = guarded(sd15.denoiser, lambda: generate_with_features(sd15, ["a photograph of a star"] * 2, num_steps=steps),
                    period=steps)
    q = class_embeddings(sd15, names)
    with DeviceFloat64() as rec:
        masks = gm.predict(batch.features, q[None].expand(2, -1, -1))
    assert not rec.found and masks.shape == (2, 3, sd15.resolution, sd15.resolution)
    for labeler, out in ((SegmenterLabeler(_Halves(names)), tmp_path / "seg"), (GroundingLabeler(sd15, gm, names),
                                                                                tmp_path / "gm")):
        guarded(sd15.denoiser, lambda: synthesize(sd15, labeler, out, num_samples=4, class_names=names, shard_size=2,
                                              num_steps=steps, batch_size=2, progress=False), period=steps)
    shards = GroundingShards(tmp_path / "seg")
    assert len(shards) == 4
    hist = guarded(gm, lambda: train_grounding(gm, shards, q, steps=6, batch_size=2, progress=False, log_every=6))
    assert math.isfinite(hist[-1]["loss"])
    path = tmp_path / "gm.pt"
    gm.save(path)
    back = GroundingModule.load(path, sd15)  # follows the backbone's device
    assert next(back.parameters()).device.type == DEVICE.type
