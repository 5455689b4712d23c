"""Every method at the real topologies (random weights): overhead over the denoiser, memory, cost against work.

    python benchmarks/run_all.py                                   # CPU, the backbones' default dtype
    python benchmarks/run_all.py --device cuda --dtype float16      # GPU
    python benchmarks/run_all.py --quick --out-dir /tmp/bench       # toy-size smoke run (seconds)
    python benchmarks/run_all.py --backbone sd3-medium               # every method on SD3-medium's MM-DiT

Backbones (speed and memory do not depend on the weights, so they are random). ``--backbone unets`` (default):
  * ADM-256, DDPM-Seg's guided-diffusion UNet (``adm_config("ddpm-seg")``, 553M parameters), for
    feature extraction at 256x256 and the DDPM-Seg ensemble on its 8448-dim features
    (output blocks 5, 6, 7, 8, 12 x t 50, 150, 250);
  * Stable Diffusion 1.5: the full UNet (860M), the full VAE and a 12-layer 768-wide CLIP text tower
    (on our toy tokenizer), for EmerDiff, the cross-attention baseline (DAAM), grounding and dataset
    synthesis at 512x512.
``--backbone sd3-medium``: every method on Stable Diffusion 3 medium at 512x512: the full MM-DiT (24 joint
blocks, 24 heads x 64, patch 2: 1024 image tokens; 2.0B), the full 16-channel VAE and both CLIP towers (L and
bigG) at full size; T5-XXL (4.7B, 19 GB in float32) is left out as the pipeline allows
(``text_encoder_3=None``): its 256 positions are zeros, so the transformer still reads 77 + 256 text tokens.

For each method and each size of its work (images, K) it measures, in this one process:
  * ``ratio`` = wall time / (the method's denoiser (UNet or transformer) evaluations x one bare forward per
    image, measured here at the batch size the method uses): its overhead over the model work it cannot avoid
    (goal <= 1.2);
    ``ratio+vae`` also counts the VAE encodes/decodes the method cannot avoid in the denominator;
  * peak memory (CUDA: ``max_memory_allocated`` above what was allocated before; CPU: the process's
    RSS sampled every 2 ms, above its value before the call) against ``must hold``: the size of what
    the method has to keep, computed from shapes (feature store, 2K latents, heat maps, ...);
  * the growth exponent of time and memory against the work (least-squares slope in log-log) and a
    log-log plot per method (``scaling_<method>_<device>.png``).
Results go to stdout and, in ``--out-dir``, to ``<run>.json`` (every measured point) and ``<run>.md`` (the table
and notes), ``<run>`` naming the device, dtype, backbone and ``--only`` set; ``benchmarks/results.md`` quotes them. To see where
the time of a slow call goes, profile it (``python -m cProfile``); the harness does not.

CPU runs use reduced step counts where a method's cost is a fixed multiple of its steps (printed):
EmerDiff 1 DDIM step below t_m (the paper: 50 steps over [0, 1000], about 15 below t_m = 281),
generation 2 steps (paper 50), the MLP ensemble a capped number of batches. ``ratio+vae`` does not
depend on the step count (every step is the same denoiser call); the denoiser-only ``ratio`` does: the VAE
work per image is fixed, so with 2 steps instead of 50 it weighs ~25x more than at the paper's steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the real checkpoints' topologies live with the test fixtures

from diffseg_utils.backbones import Backbone, PixelBackbone, SDBackbone  # noqa: E402
from topologies import sd15_text_config, sd15_unet_config, sd15_vae_config  # noqa: E402

GOAL = 1.2
METHODS = ["features", "ddpmseg", "emerdiff", "daam", "grounding", "synthesis"]  # what --only can pick
ADM_BLOCKS, ADM_TIMESTEPS = [5, 6, 7, 8, 12], [50, 150, 250]


# ---------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS
    growth during the next call measures what that call allocates."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled process RSS on the CPU."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        _release_free_memory()  # heap kept from earlier calls would hide this call's growth in RSS
        self._proc = psutil.Process()
        self._base = self._max = self._proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._proc.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._proc.memory_info().rss)
        self.peak = self._max - self._base


class DenoiserCounter:
    """Counts denoiser calls and the batch elements they carry (a forward pre-hook), for the report."""

    def __init__(self, unet):
        self.unet, self.calls, self.elements = unet, 0, 0

    def __enter__(self):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.calls += 1
            self.elements += x.shape[0]
        self._h = self.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._h.remove()


def run_measured(fn, device: torch.device, unet=None):
    """(seconds, peak bytes, result) of ``fn()``; with ``unet``, also the denoiser batch elements seen during the call
    (a 4th item)."""
    if unet is not None:
        with DenoiserCounter(unet) as cnt:
            out = run_measured(fn, device)
        return (*out, cnt.elements)
    _sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        secs = time.perf_counter() - t0
    return secs, mem.peak, out


class Bare:
    """One bare denoiser forward (and VAE encode/decode) per image, timed here at a given batch size."""

    def __init__(self, device: torch.device, repeats: int, max_batch: int | None):
        self.device, self.repeats, self.max_batch = device, repeats, max_batch
        self.cache: dict = {}

    def _time(self, fn) -> float:
        fn()  # warm-up (kernel selection, oneDNN primitives)
        best = math.inf
        for _ in range(self.repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            fn()
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return best

    def _batch(self, b: int) -> int:
        return max(1, min(b, self.max_batch)) if self.max_batch else max(1, b)

    @torch.no_grad()
    def unet(self, bb: Backbone, batch: int, t: int = 281) -> float:
        """Seconds per batch element of ``bb.denoiser`` at batch ``batch`` (empty-prompt condition)."""
        b = self._batch(batch)
        key = ("unet", id(bb), b)
        if key not in self.cache:
            r = bb.latent_resolution
            x = torch.randn(b, bb.latent_channels, r, r, device=bb.device, dtype=bb.dtype)
            tt = torch.full((b,), t, device=bb.device, dtype=torch.long)
            cond = bb.empty_prompt(b)
            self.cache[key] = self._time(lambda: bb.predict(x, tt, cond)) / b
        return self.cache[key]

    @torch.no_grad()
    def with_maps(self, bb: Backbone, concepts: list[str]) -> float:
        """Seconds per batch element that recording the attention maps adds to a guided ``[uncond; cond]`` call."""
        from diffseg_utils.grounding.protocols import attention_maps

        key = ("maps", id(bb), tuple(concepts))
        if key not in self.cache:
            r = bb.latent_resolution
            x = torch.randn(2, bb.latent_channels, r, r, device=bb.device, dtype=bb.dtype)
            tt = torch.full((2,), 281, device=bb.device, dtype=torch.long)
            cond = bb.empty_prompt(2)

            def call():
                with attention_maps(bb, cfg_batch=True, concepts=concepts):
                    bb.predict(x, tt, cond)
            self.cache[key] = max(0.0, self._time(call) / 2 - self.unet(bb, 2))
        return self.cache[key]

    @torch.no_grad()
    def decode(self, bb: Backbone, batch: int) -> float:
        if bb.vae is None:
            return 0.0
        b = self._batch(batch)
        key = ("decode", id(bb), b)
        if key not in self.cache:
            r = bb.latent_resolution
            z = torch.randn(b, bb.latent_channels, r, r, device=bb.device, dtype=bb.dtype)
            self.cache[key] = self._time(lambda: bb.vae.decode(z)) / b
        return self.cache[key]

    @torch.no_grad()
    def encode(self, bb: Backbone) -> float:
        if bb.vae is None:
            return 0.0
        key = ("encode", id(bb))
        if key not in self.cache:
            x = torch.rand(1, 3, bb.resolution, bb.resolution, device=bb.device, dtype=bb.dtype) * 2 - 1
            self.cache[key] = self._time(lambda: bb.vae.encode(x))
        return self.cache[key]


@dataclass
class Point:
    """One measured size of one method."""

    work: float
    seconds: float
    peak: int
    must_hold: int
    unet_evals: float
    unet_seconds: float = 0.0    # evals x bare forward per element
    vae_seconds: float = 0.0     # unavoidable VAE calls x bare VAE call per image
    note: str = ""
    seen: int = 0                # denoiser batch elements actually run (forward pre-hook)

    @property
    def ratio(self) -> float:
        return self.seconds / self.unet_seconds if self.unet_seconds else float("nan")

    @property
    def ratio_vae(self) -> float:
        d = self.unet_seconds + self.vae_seconds
        return self.seconds / d if d else float("nan")


@dataclass
class Method:
    name: str
    work_label: str
    setting: str
    points: list[Point] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    memory_note: str = ""

    def exponent(self, attr: str) -> float:
        pts = [p for p in self.points if getattr(p, attr) > 0]
        if len(pts) < 2 or len({p.work for p in pts}) < 2:
            return float("nan")
        x = np.log([p.work for p in pts])
        y = np.log([getattr(p, attr) for p in pts])
        return float(np.polyfit(x, y, 1)[0])


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


# ---------------------------------------------------------------------------- backbones
def build_adm(device, dtype, quick: bool) -> Backbone:
    from diffusers import UNet2DModel

    from diffseg_utils.adm import DDPMSEG_FLAGS, adm_config, adm_scheduler

    torch.manual_seed(0)
    # quick: the same ADM layout (scale-shift norms, resblock up/down, 6 levels) at 64 px and 32 base channels
    flags = {**DDPMSEG_FLAGS, "num_channels": 32, "image_size": 64, "channel_mult": "1,1,2,2,4,4",
             "num_head_channels": 32} if quick else "ddpm-seg"
    unet, sched = UNet2DModel(**adm_config(flags, eps_only=True)), adm_scheduler(flags, eps_only=True)
    bb = PixelBackbone(unet=unet, scheduler=sched, name="adm-256" if not quick else "adm-tiny", device=device, dtype=dtype)
    bb.blocks()  # the one dry run every method starts with, out of the timings
    return bb


def build_sd(device, dtype, quick: bool) -> Backbone:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffseg_utils.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(prefix="bench_tok_"), model_max_length=16 if quick else 77)
    text = CLIPTextModel(CLIPTextConfig(**sd15_text_config(quick, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False)
    bb = SDBackbone(unet=UNet2DConditionModel(**sd15_unet_config(quick)), vae=AutoencoderKL(**sd15_vae_config(quick)),
                  text_encoder=text, tokenizer=tok, scheduler=sched, name="sd-1.5" if not quick else "sd-tiny",
                  device=device, dtype=dtype)
    bb.blocks()  # the one dry run every method starts with, out of the timings
    return bb


def sd3_medium_transformer_config(quick: bool) -> dict:
    """SD3-medium's ``SD3Transformer2DModel`` config (stabilityai/stable-diffusion-3-medium-diffusers), or a toy one."""
    if quick:
        return dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                    pos_embed_max_size=16)
    return dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                pos_embed_max_size=192)  # sample_size 64: 512x512 images (the checkpoint's native side is 1024)


def build_sd3(device, dtype, quick: bool) -> Backbone:
    """SD3-medium at 512x512: full MM-DiT, full 16-channel VAE, CLIP-L and CLIP-bigG towers; no T5 (zeros)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffseg_utils.backbones import SD3Backbone
    from diffseg_utils.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(prefix="bench_tok_"), model_max_length=16 if quick else 77)

    def clip(hidden, layers, heads):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=tok.model_max_length, projection_dim=hidden,
            hidden_act="quick_gelu" if hidden == 768 else "gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))

    vae_cfg = {**sd15_vae_config(quick), "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
               "use_quant_conv": False, "use_post_quant_conv": False}
    enc = (clip(16, 1, 2), clip(16, 1, 2)) if quick else (clip(768, 12, 12), clip(1280, 32, 20))
    bb = SD3Backbone(transformer=SD3Transformer2DModel(**sd3_medium_transformer_config(quick)),
                     vae=AutoencoderKL(**vae_cfg), text_encoder=enc[0], text_encoder_2=enc[1], tokenizer=tok,
                     tokenizer_2=tok, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                     max_sequence_length=8 if quick else 256, name="sd3-tiny" if quick else "sd3-medium",
                     device=device, dtype=dtype)
    bb.blocks()  # the one dry run every method starts with, out of the timings
    return bb


def n_params(m) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


# ---------------------------------------------------------------------------- methods
def feature_places(bb: Backbone) -> list:
    """DDPM-Seg's blocks on ADM; on a transformer, three blocks at a third, a half and two thirds of its depth."""
    if isinstance(bb, PixelBackbone):
        return ADM_BLOCKS
    names = bb.feature_blocks()
    return [names[i] for i in sorted({len(names) // 3, len(names) // 2, 2 * len(names) // 3})]


def bench_features(bb: Backbone, bare: Bare, plan: dict) -> tuple[Method, object]:
    """DDPM-Seg feature extraction at the backbone's resolution; work = images."""
    from diffseg_utils.features import extract_features

    bs = plan["feature_batch"]
    blocks = feature_places(bb)
    m = Method("features", "images", f"{bb.name} {bb.resolution}px, blocks {blocks} x t {ADM_TIMESTEPS}, "
                                     f"batch {bs} image(s) x {len(ADM_TIMESTEPS)} t per denoiser call")
    fm = None
    for n in plan["feature_images"]:
        imgs = torch.rand(n, 3, bb.resolution, bb.resolution)
        secs, peak, fm, seen = run_measured(
            lambda: extract_features(bb, imgs, blocks, ADM_TIMESTEPS, batch_size=bs, progress=False),
            bb.device, unet=bb.denoiser)
        evals = len(ADM_TIMESTEPS) * n
        ub = len(ADM_TIMESTEPS) * min(bs, n)
        m.points.append(Point(n, secs, peak, fm.nbytes(), evals, evals * bare.unet(bb, ub, t=ADM_TIMESTEPS[0]),
                              n * bare.encode(bb), seen=seen))  # a latent model must also encode each image
    dense = fm.channels * bb.resolution ** 2 * 4
    m.memory_note = (f"must hold = the lazy fp16 store ({mib(fm.nbytes() / fm.num_images)} / image, {fm.channels} "
                     f"dims at native resolutions); DDPM-Seg's dense fp32 store would be {mib(dense)} / image "
                     f"({fm.channels} x {bb.resolution}^2 x 4 B, from shapes: {dense / (fm.nbytes() / fm.num_images):.0f}x)")
    return m, fm


def bench_ddpmseg(fm, bb: Backbone, plan: dict) -> list[Method]:
    """The 10-member MLP ensemble on the extracted features: fit (capped batches) and predict."""
    from diffseg_utils.ddpmseg import FewShotSegmenter
    from diffseg_utils.pixel_classifier import EnsembleConfig

    K = 28
    H, W = fm.image_size
    n = fm.num_images
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (n, H, W), generator=g).numpy()
    steps = plan["ensemble_steps"]
    cfg = EnsembleConfig(num_classes=K, max_steps=steps)
    seg = FewShotSegmenter(None, fm.blocks, fm.timesteps, K, config=cfg)
    secs, peak, _ = run_measured(lambda: seg.fit(None, labels, features=fm, progress=False), bb.device)
    fit = Method("ddpmseg-fit", "batches", f"{fm.channels} dims, {n} image(s) {H}x{W}, 10 members, batch 64, "
                                           f"{steps} batches (capped; the paper trains to early stopping)")
    member_params = sum(p.numel() for p in seg.ensemble.params()) * 4
    fit.points.append(Point(steps, secs, peak, member_params, 0, 0.0, note=f"{1e3 * secs / steps:.1f} ms / batch"))
    fit.memory_note = (f"must hold = the 10 members' parameters ({mib(member_params)}); training pixels' dense fp32 "
                       f"features would be {mib(n * H * W * fm.channels * 4)}")
    pred = Method("ddpmseg-predict", "images", f"{fm.channels} dims, {H}x{W}, 10 members, chunks of 16384 pixels")
    for k in plan["predict_images"]:
        sub = fm.images(slice(0, k))
        secs, peak, _ = run_measured(lambda: seg.predict(features=sub), bb.device)
        pred.points.append(Point(k, secs, peak, k * H * W * (8 + 4), 0, 0.0,
                                 note=f"{1e6 * secs / (k * H * W):.1f} us / pixel"))
    pred.memory_note = (f"must hold = labels + uncertainty ({12} B / pixel); the dense fp32 features DDPM-Seg "
                        f"predicts from would be {mib(H * W * fm.channels * 4)} / image")
    return [fit, pred]


def bench_emerdiff(bb: Backbone, bare: Bare, plan: dict) -> Method:
    """EmerDiff on one image; work = K (segments)."""
    from diffseg_utils.emerdiff import emerdiff_segment

    steps = plan["emerdiff_steps"]
    chunk, dec = 16, 8
    m = Method("emerdiff", "K", f"{bb.name} {bb.resolution}px, 1 image, t_m = 281, num_steps={steps}"
                                f" (sampler steps below t_m: see evals), chunk_size {chunk}, decode_batch_size {dec}")
    img = torch.rand(1, 3, bb.resolution, bb.resolution)
    deadline = plan.get("deadline")
    for i, K in enumerate(plan["emerdiff_K"]):
        if i and deadline is not None:  # cost is linear in K: skip a size that would overrun the run's budget
            last = m.points[-1]
            need = last.seconds * K / last.work
            if time.perf_counter() + need > deadline:
                m.extra.append(f"K = {K} skipped: projected {need:.0f} s would exceed the run's time budget "
                               f"(--budget); run it alone with --only emerdiff")
                continue
        secs, peak, res, seen = run_measured(
            lambda: emerdiff_segment(bb, img, K, num_steps=steps, chunk_size=chunk,
                                     decode_batch_size=dec, progress=False), bb.device, unet=bb.denoiser)
        k_eff = int(torch.unique(res.low_res[0]).numel())
        evals = res.min_denoiser_evals_per_image
        ts = res.extra["timesteps"]

        r = bb.latent_resolution
        hold = 2 * k_eff * bb.latent_channels * r * r * bb.dtype.itemsize + K * bb.resolution ** 2 * 4
        m.points.append(Point(K, secs, peak, hold, evals, evals * bare.unet(bb, min(chunk, 2 * k_eff)),
                              bare.encode(bb) + 2 * k_eff * bare.decode(bb, dec),
                              note=f"{k_eff} segments, {len(ts)} denoiser steps per run {ts}"
                                   + ("; the t_m pass runs the shared prefix once (batch 1)" if seen < evals else ""),
                              seen=seen))
    m.memory_note = ("must hold = the 2K final latents + the K float32 difference maps at image size "
                     "(from shapes); decoded images are reduced chunk by chunk")
    return m


def _prompts(n: int) -> tuple[list[str], list[str]]:
    from diffseg_utils.toy.world import CATEGORIES

    words = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    return [f"a photograph of a {w}" for w in words], words


def bench_daam(bb: Backbone, bare: Bare, plan: dict) -> Method:
    """Attention maps of a generation: DAAM on a UNet; joint cross-attention and ConceptAttention on an MM-DiT
    (as protocol I collects them); work = images."""
    from diffseg_utils.grounding.protocols import attention_maps, attention_masks
    from diffseg_utils.joint_attention import has_joint_blocks
    from diffseg_utils.sampling import generate

    steps, joint = plan["gen_steps"], has_joint_blocks(bb)
    kind = "joint cross-attention + ConceptAttention (all joint blocks)" if joint else "DAAM"
    m = Method("daam", "images", f"{bb.name} {bb.resolution}px, {kind}, {steps} sampler steps, guidance 7.5 (batch 2N)")
    L = bb.tokenizer.model_max_length

    def run(prompts, words, concepts):
        with attention_maps(bb, cfg_batch=True, concepts=concepts if joint else None) as maps:
            images = generate(bb, prompts, num_steps=steps, guidance_scale=7.5)
        return attention_masks(maps, prompts, [[w] for w in words], images.shape[-1])

    for n in plan["gen_images"]:
        prompts, words = _prompts(n)
        concepts = sorted(set(words)) + ["background"]
        secs, peak, _, seen = run_measured(lambda: run(prompts, words, concepts), bb.device, unet=bb.denoiser)
        evals = 2 * n * steps
        hold = n * L * bb.latent_resolution ** 2 * 4
        p = Point(n, secs, peak, hold, evals, evals * bare.unet(bb, 2 * n), n * bare.decode(bb, n), seen=seen)
        if joint:  # the maps' own arithmetic (the joint softmax of the image queries, recomputed per layer)
            extra = bare.with_maps(bb, concepts) * evals
            p.note = (f"the maps' own computation, timed here (a guided call with the maps on minus a bare one): "
                      f"{extra:.1f} s; wall / (bare + VAE + that) = {secs / (p.unet_seconds + p.vae_seconds + extra):.2f}")
        m.points.append(p)
    m.memory_note = "must hold = the running (N, tokens, h, w) float32 sum of maps (bounded by the latent grid)"
    return m


def bench_grounding(bb: Backbone, bare: Bare, plan: dict) -> Method:
    from diffseg_utils.grounding.features import generate_with_features
    from diffseg_utils.grounding.module import GroundingModule, class_embeddings

    steps = plan["gen_steps"]
    gm = GroundingModule.for_backbone(bb)
    m = Method("grounding", "images", f"{bb.name} {bb.resolution}px, generate_with_features ({steps} sampler steps, "
                                      f"guidance 5) + GroundingModule.predict ({n_params(gm):.1f}M params, fp32)")

    def run(prompts, words):
        batch = generate_with_features(bb, prompts, num_steps=steps, guidance_scale=5.0)
        q = class_embeddings(bb, words)[:, None]          # one query per image
        return batch, gm.predict(batch.features, q)

    for n in plan["gen_images"]:
        prompts, words = _prompts(n)
        secs, peak, (batch, _), seen = run_measured(lambda: run(prompts, words), bb.device, unet=bb.denoiser)
        evals = 2 * n * steps
        hold = sum(f.numel() * f.element_size() for f in batch.features.values())
        m.points.append(Point(n, secs, peak, hold, evals, evals * bare.unet(bb, 2 * n), n * bare.decode(bb, n),
                              seen=seen))
    m.memory_note = (f"must hold = the grouped fp16 features ({mib(m.points[-1].must_hold / plan['gen_images'][-1])}"
                     " / image, uncond + cond)")
    return m


class _ChannelSegmenter:
    """A stand-in detector: class j = pixels where colour channel j % 3 is above 0 (score 1)."""

    name = "channel-threshold"

    def __init__(self, class_names):
        self.class_names = tuple(class_names)

    def __call__(self, images):
        from diffseg_utils.grounding.segmenter import SegmenterOutput

        masks = torch.stack([images[:, j % 3] > 0 for j in range(len(self.class_names))], 1)
        return SegmenterOutput(masks, torch.ones(images.shape[0], len(self.class_names)), self.class_names)


def bench_synthesis(bb: Backbone, bare: Bare, plan: dict) -> list[Method]:
    from diffseg_utils.grounding.labelers import SegmenterLabeler
    from diffseg_utils.grounding.module import GroundingModule, class_embeddings
    from diffseg_utils.grounding.shards import GroundingShards, synthesize
    from diffseg_utils.grounding.train import train_grounding
    from diffseg_utils.toy.world import CATEGORIES

    steps, bs = plan["gen_steps"], plan["synth_batch"]
    names = list(CATEGORIES[:4])
    labeler = SegmenterLabeler(_ChannelSegmenter(names))
    m = Method("synthesis", "samples", f"{bb.name} {bb.resolution}px, synthesize(): {steps} sampler steps, guidance 5, "
                                       f"batch {bs}, features kept, stand-in labeler, shards on local disk")
    root = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    last = None
    for n in plan["synth_samples"]:
        out = root / f"n{n}"
        secs, peak, _, seen = run_measured(
            lambda: synthesize(bb, labeler, out, num_samples=n, class_names=names, shard_size=max(bs, n),
                               num_steps=steps, guidance_scale=5.0, batch_size=bs, progress=False),
            bb.device, unet=bb.denoiser)
        disk = sum(f.stat().st_size for f in out.glob("shard_*.pt"))
        evals = 2 * n * steps
        m.points.append(Point(n, secs, peak, disk, evals, evals * bare.unet(bb, 2 * min(bs, n)),
                              n * bare.decode(bb, min(bs, n)), note=f"{n / secs:.3f} samples/s, {mib(disk)} on disk",
                              seen=seen))
        last = out
    m.memory_note = "must hold = one shard (features + images + masks, its size on disk)"
    # training the grounding module on those shards: step time at batch 2 (no UNet)
    shards = GroundingShards(last)
    gm = GroundingModule.for_backbone(bb)
    q = class_embeddings(bb, shards.class_names)
    tsteps = plan["train_steps"]
    secs, peak, _ = run_measured(lambda: train_grounding(gm, shards, q, steps=tsteps, batch_size=2, progress=False,
                                                            log_every=tsteps), bb.device)
    tr = Method("grounding-train", "steps", f"train_grounding on the shards, batch 2, {tsteps} steps, fp32 module")
    tr.points.append(Point(tsteps, secs, peak, sum(p.numel() * 4 * 4 for p in gm.parameters()), 0, 0.0,
                           note=f"{secs / tsteps:.2f} s / step"))
    tr.memory_note = "must hold = parameters + Adam moments + gradients (4 x fp32 parameters)"
    return [m, tr]


# ---------------------------------------------------------------------------- report
def plot(m: Method, path: Path) -> None:
    """Log-log plot of time (with the unavoidable model time beneath it) and peak memory against the work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, NullFormatter, NullLocator, ScalarFormatter

    pts = sorted(m.points, key=lambda p: p.work)
    w = [p.work for p in pts]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(6.4, 2.6), dpi=100)
    ax.loglog(w, [p.seconds for p in pts], "o-", label=f"wall time (slope {m.exponent('seconds'):.2f})")
    if any(p.unet_seconds for p in pts):
        ax.loglog(w, [p.unet_seconds + p.vae_seconds for p in pts], "k--", lw=0.8,
                  label="bare denoiser x evals" + (" + VAE" if any(p.vae_seconds for p in pts) else ""))
    ax.set_ylabel("seconds")
    ax2.loglog(w, [max(p.peak, 1) / 2**20 for p in pts], "s-", color="C1",
               label=f"peak (slope {m.exponent('peak'):.2f})")
    ax2.loglog(w, [max(p.must_hold, 1) / 2**20 for p in pts], "^:", color="C2", label="must hold (from shapes)")
    ax2.set_ylabel("MiB")
    for a in (ax, ax2):
        a.set_xlabel(m.work_label)
        a.xaxis.set_major_locator(FixedLocator(w))
        a.xaxis.set_major_formatter(ScalarFormatter())
        a.xaxis.set_minor_locator(NullLocator())
        a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
        a.legend(fontsize=7, loc="best")
    ax.yaxis.set_major_locator(FixedLocator([p.seconds for p in pts]))   # label the measured times themselves
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    fig.suptitle(m.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(methods: list[Method]) -> list[str]:
    out = ["| method | work | seconds | denoiser evals (run) | bare denoiser x evals (s) | ratio (goal <= 1.2) | ratio+vae | "
           "peak mem | must hold | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for p in m.points:
            r = f"{p.ratio:.2f}" if p.unet_seconds else "n/a"
            rv = f"{p.ratio_vae:.2f}" if p.vae_seconds else "n/a"
            flag = " **>1.2**" if p.unet_seconds and p.ratio > GOAL else ""
            out.append(f"| {m.name} | {m.work_label} = {p.work:g} | {p.seconds:.2f} | {p.unet_evals:g} ({p.seen}) | "
                       f"{p.unet_seconds:.2f} | {r}{flag} | {rv} | {mib(p.peak)} | {mib(p.must_hold)} | {p.note} |")
    return out


def report(methods: list[Method], env: dict, plan: dict, args) -> str:
    lines = [f"### {env['key']}: {env['date']}", "",
             f"- machine: {env['machine']}", f"- torch {torch.__version__}, threads {torch.get_num_threads()}, "
             f"device {env['device']}, dtype {env['dtype']}{' (--quick: toy sizes, ratios not meaningful)' if args.quick else ''}",
             f"- backbones: {env['backbones']}",
             f"- load average (1 min) at start / end: {env['load']}",
             f"- bare denoiser forward per image: {env['bare']}",
             f"- reduced work on this run: {plan['reduced']}", "", *table(methods), "",
             "Growth exponents (least-squares slope of log cost against log work; time should be ~1 in images and "
             "K, memory should not grow like the dense store):", ""]
    for m in methods:
        if len(m.points) > 1:
            lines.append(f"- {m.name}: time ~ {m.work_label}^{m.exponent('seconds'):.2f}, peak memory ~ "
                         f"{m.work_label}^{m.exponent('peak'):.2f}, must-hold ~ {m.work_label}^"
                         f"{m.exponent('must_hold'):.2f} (plot: scaling_{m.name}_{env['device']}.png)")
    lines += ["", "Settings and memory:", ""]
    for m in methods:
        lines.append(f"- **{m.name}**: {m.setting}. {m.memory_note}")
        lines += [f"  - {x}" for x in m.extra]
    return "\n".join(lines) + "\n"


def run_key(device: torch.device, dtype: torch.dtype, quick: bool, only: set[str], backbone: str = "unets") -> str:
    """The name of a run's files: device, dtype, --quick, the backbone and the --only set (a run of some methods is
    its own run)."""
    key = f"{device.type}-{str(dtype).replace('torch.', '')}{'-quick' if quick else ''}"
    key += "" if backbone == "unets" else f"-{backbone}"
    return key if set(only) == set(METHODS) else key + "-only-" + "+".join(m for m in METHODS if m in only)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PLANS = {
    # toy sizes: seconds, for the smoke test
    "quick": dict(feature_images=[1, 2], feature_batch=1, ensemble_steps=5, predict_images=[1], emerdiff_K=[2, 4],
                  emerdiff_steps=2, gen_images=[1, 2], gen_steps=2, synth_samples=[1, 2], synth_batch=2, train_steps=2,
                  repeats=1, max_bare_batch=4, reduced="toy-size models (--quick)"),
    # full topologies on a CPU, float32: 47 minutes on 2 cores (EmerDiff's K = 10 skipped by the default
    # budget; --only emerdiff runs K = 5 and 10 in 31 minutes)
    "cpu": dict(feature_images=[1, 2, 4], feature_batch=1, ensemble_steps=100, predict_images=[1, 2], emerdiff_K=[5, 10],
                emerdiff_steps=1, gen_images=[1, 2], gen_steps=2, synth_samples=[2, 4], synth_batch=2, train_steps=5,
                repeats=1, max_bare_batch=4,
                reduced="EmerDiff num_steps=1 (2 UNet steps per modulated run: t_m = 281 and 1; the paper "
                        "denoises 50-step DDIM from t_m, ~16 steps) at K = 5 and 10 (the GPU plan: 10, 20, 40; "
                        "each K costs 2K VAE decodes of ~30 s at 512x512 on 2 cores); generation 2 DDIM steps (paper 50); the ensemble "
                        "100 batches (paper: to early stopping); bare forwards timed at batch <= 4 (per-image cost "
                        "is flat in the batch on a CPU)"),
    # overrides of "cpu" for --backbone sd3-medium: one size per method, 7 minutes on 2 cores (a forward of the 2B
    # MM-DiT over 1024 image + 333 text tokens: 6-7 s); the growth exponents are the UNet runs'
    "cpu-sd3": dict(feature_images=[1], predict_images=[1], emerdiff_K=[3], gen_images=[1], synth_samples=[1],
                    synth_batch=1, train_steps=2, max_bare_batch=1,
                    reduced="one size per method (features 1 image, EmerDiff K = 3 with num_steps=1, DAAM and "
                            "grounding 1 image, synthesis 1 sample), generation 2 flow steps (SD3's default 28), the "
                            "ensemble 100 batches; bare forwards timed at batch 1 (per-image cost is flat in the "
                            "batch on a CPU)"),
    "cuda": dict(feature_images=[2, 4, 8], feature_batch=8, ensemble_steps=1000, predict_images=[2, 4], emerdiff_K=[10, 20, 40],
                 emerdiff_steps=50, gen_images=[1, 2, 4], gen_steps=50, synth_samples=[4, 8, 16], synth_batch=4,
                 train_steps=50, repeats=3, max_bare_batch=None,
                 reduced="none (paper steps); the ensemble 1000 batches (paper: to early stopping)"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="backbone dtype (default: float16 on CUDA, float32 elsewhere)")
    ap.add_argument("--quick", action="store_true", help="toy-size models, a few seconds (smoke test)")
    ap.add_argument("--only", nargs="*", default=None,
                    choices=METHODS)
    ap.add_argument("--backbone", default="unets", choices=["unets", "sd3-medium"],
                    help="unets: ADM-256 for features and DDPM-Seg, SD 1.5 for the others; sd3-medium: every method "
                         "on SD3-medium")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "runs",
                    help="where <run>.json, <run>.md and the plots go (default: benchmarks/runs/)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (CPU default 3000): EmerDiff's larger K are skipped when they "
                         "would overrun it")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    plan = dict(PLANS["quick" if a.quick else ("cuda" if device.type == "cuda" else "cpu")])
    if a.backbone == "sd3-medium" and device.type == "cpu" and not a.quick:
        plan.update(PLANS["cpu-sd3"])
    budget = a.budget if a.budget is not None else (3000.0 if device.type == "cpu" and not a.quick else None)
    only = set(a.only or METHODS)
    bare = Bare(device, plan["repeats"], plan["max_bare_batch"])
    a.out_dir.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    env = {"key": run_key(device, dtype, a.quick, only, a.backbone),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "machine": f"{dev_name}; {os.cpu_count()} CPU(s) visible; {platform.platform()}",
           "device": device.type, "dtype": str(dtype).replace("torch.", ""), "load0": os.getloadavg()[0]}
    t_start = time.perf_counter()
    plan["deadline"] = t_start + budget if budget else None
    methods: list[Method] = []
    bbs, bare_txt = [], {}  # (backbone, batch) -> its bare forward, reported once

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def flush(final: bool) -> str:
        """Write <run>.md and <run>.json now (after every method, so an interrupted run keeps what it measured)."""
        env["backbones"] = "; ".join(bbs)
        env["load"] = f"{env['load0']:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        env["bare"] = ", ".join(bare_txt.values()) or "see the table"
        if final:
            for m in methods:
                if len(m.points) > 1:
                    plot(m, a.out_dir / f"scaling_{m.name}_{device.type}.png")
        section = report(methods, env, plan, a)
        state = "" if final else " (partial: the run was still going when this was written)"
        section += f"\nWall time of this run{state}: {time.perf_counter() - t_start:.0f} s.\n"
        (a.out_dir / f"{env['key']}.md").write_text(section)
        (a.out_dir / f"{env['key']}.json").write_text(json.dumps({"env": env, "methods": [
            {"name": m.name, "work": m.work_label, "time_exponent": m.exponent("seconds"),
             "memory_exponent": m.exponent("peak"), "points": [
                 {**{k: getattr(p, k) for k in ("work", "seconds", "peak", "must_hold", "unet_evals", "unet_seconds",
                                                 "vae_seconds", "seen", "note")}, "ratio": p.ratio}
                 for p in m.points]} for m in methods]}, indent=1))
        return section

    def describe(bb: Backbone) -> str:
        parts = [f"{bb.name} {type(bb.denoiser).__name__} {n_params(bb.denoiser):.0f}M"]
        if bb.vae is not None:
            parts.append(f"VAE {n_params(bb.vae):.0f}M")
        if bb.text_encoders:
            parts.append("text " + " + ".join(f"{n_params(t):.0f}M" for t in bb.text_encoders))
        return " + ".join(parts)

    gen = None
    if a.backbone == "sd3-medium":
        gen = build_sd3(device, dtype, a.quick)
        bbs.append(describe(gen))
        log(f"built {gen}")
    if only & {"features", "ddpmseg"}:
        fbb = gen or build_adm(device, dtype, a.quick)  # the features' backbone
        if gen is None:
            bbs.append(describe(fbb))
            log(f"built {fbb}")
        m, fm = bench_features(fbb, bare, plan)
        methods.append(m)
        b = bare._batch(3 * plan["feature_batch"])
        bare_txt[(fbb.name, b)] = f"{fbb.name} {1e3 * bare.unet(fbb, b):.0f} ms (batch {b})"
        log(f"features done: ratios {[round(p.ratio, 2) for p in m.points]}")
        flush(final=False)
        if "ddpmseg" in only:
            methods += bench_ddpmseg(fm, fbb, plan)
            log("ddpmseg done")
            flush(final=False)
        del fbb, fm
    if only & {"emerdiff", "daam", "grounding", "synthesis"}:
        sd = gen or build_sd(device, dtype, a.quick)
        if gen is None:
            bbs.append(describe(sd))
            log(f"built {sd}")
        for name, fn in (("daam", bench_daam), ("grounding", bench_grounding), ("synthesis", bench_synthesis),
                         ("emerdiff", bench_emerdiff)):  # EmerDiff last: its largest K fills the time left
            if name in only:
                got = fn(sd, bare, plan)
                methods += got if isinstance(got, list) else [got]
                log(f"{name} done")
                flush(final=False)
        bare_txt.setdefault((sd.name, 1), f"{sd.name} {1e3 * bare.unet(sd, 1):.0f} ms (batch 1)")
        if sd.vae is not None:
            bare_txt.setdefault("vae", f"VAE decode {1e3 * bare.decode(sd, 1):.0f} ms, encode {1e3 * bare.encode(sd):.0f} ms")
    print(flush(final=True))


if __name__ == "__main__":
    main()
