"""EmerDiff (Namekata et al., ICLR 2024): training-free pixel-level segments from a diffusion model.

1. **Low-resolution segments**: k-means on the query vectors of one attention layer (SD 1.x:
   the first cross-attention of the 16x16 up level) for the image noised to ``t_f``.
2. **Modulated denoising**: noise the image to ``t_m`` and denoise to 0 twice per segment k,
   adding ``+lam * M_k`` and ``-lam * M_k`` to that layer's output (after its output projection)
   at step ``t_m`` only; the runs share the noise, and (attention injection) reuse the
   unmodulated pass's attention probabilities at ``t_m``.
3. **Pixel assignment**: per pixel, ``d_k = ||I_minus - I_plus||_2`` over RGB, Gaussian blur,
   divide by the map's max, label = argmax_k d_k.

All 2K runs of an image are batched (``chunk_size`` runs at a time); at ``t_m`` the UNet part
before the modulated up block runs once at batch 1 and is broadcast to the runs (forward
pre-hooks), so the shared prefix is computed once. Defaults from the paper: ``t_f=1``,
``t_m=281``, ``lam=10``, the layer choice, attention injection on, blur 5x5 with sigma 3
(from VidSeg's code). Our choices: ``num_steps=50`` (DDIM, eta 0: the schedule
below ``t_m``, any ``prediction_type``, see :meth:`~diffseg_utils.backbones.Backbone.step`), k-means
as the best of 50 greedy k-means++ restarts with 30 Lloyd iterations (batched on the device), and the
first attention layer of the chosen level as the modulated layer (the paper found the three
16x16 layers similar). The 2K modulated images are decoded ``decode_batch_size`` at a time and
reduced to difference maps on the fly.
``modulate_layer`` may sit at a finer up level than the k-means layer (the segments are then
nearest-resized to it); :func:`choose_emerdiff_settings` picks lam, that layer and t_m on validation
images (notebook 03).

**Non-square images** are letterboxed by default (``fit="pad"``, :mod:`diffseg_utils.inputs`): the
whole image is seen, and the gray border takes no part in the method. k-means clusters only the
query tokens whose centres fall on the image; border tokens get the id of the nearest image token
(so the low-res map and its upsampling baselines read like the image extended to the border) but
are never modulated; the difference maps are blurred and max-normalised over the image's pixels
only. ``result.labels`` / ``result.scores`` are at each input image's own size.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import ControlledAttnProcessor, attention_layers, finer_up_layer, low_res_query_layer
from .backbones import Backbone
from .hooks import AttentionProcessors
from .inputs import Geometry, ImageGeometry, restore_labels

__all__ = ["EmerDiffResult", "choose_emerdiff_settings", "emerdiff_segment", "gaussian_blur", "hungarian_mious", "kmeans",
           "kmeans_upsampled_features", "mean_hungarian_miou", "upsample_segments"]


@dataclass
class EmerDiffResult:
    """EmerDiff's output for N images (K = ``num_segments``; segment ids are k-means cluster ids, not classes).

    At each input image's own size (the model's letterbox / crop undone, see :mod:`diffseg_utils.inputs`):

    * ``labels``: (N, H, W) int64 segment ids, or a list of (H_i, W_i) tensors when the images'
      sizes differ; ``pixels`` carried to each image with nearest sampling. With ``fit="crop"`` the
      sides the model never saw are 255.
    * ``scores`` (property, computed on access): (N, K, H, W) float32 (a list of (K, H_i, W_i) when
      sizes differ), the difference maps ``diffs`` resampled bilinearly; 0 for ids k-means left empty.
      ``labels`` is their argmax up to resampling. Memory: K floats per input pixel.

    On the model's square canvas (``size`` = the backbone's resolution):

    * ``low_res``: (N, h, w) int64 k-means ids on the query layer's token grid (border tokens of a
      letterboxed image carry the nearest image token's id; they were not clustered or modulated);
    * ``pixels``: (N, size, size) int64, argmax_k of ``diffs`` (padding: the nearest image pixel's id);
    * ``diffs``: (N, K, size, size) float32, blurred difference maps, each divided by its maximum over
      the image's pixels (0 in the padding and for empty ids);
    * ``geometry``: the :class:`~diffseg_utils.inputs.Geometry` of the placement;
    * ``images_plus`` / ``images_minus``: with ``return_images``, (N, K, 3, size, size) in [-1, 1].
    """

    low_res: torch.Tensor
    pixels: torch.Tensor
    diffs: torch.Tensor
    labels: torch.Tensor | list[torch.Tensor]
    geometry: Geometry
    layer: str
    denoiser_evals_per_image: float
    min_denoiser_evals_per_image: float
    seconds_per_image: float
    images_plus: torch.Tensor | None = None    # (N, K, 3, H, W) in [-1, 1]
    images_minus: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor | list[torch.Tensor]:
        """(N, K, H, W) float32 difference maps at each input's own size (a list when sizes differ)."""
        outs = []
        for i, g in enumerate(self.geometry.images):
            # replicate the image's edge into the padding first: bilinear sampling at the image's border
            # pixels then never mixes in the padding's zeros
            d = _fill_outside(self.diffs[i], _pixel_box(g, tuple(self.diffs.shape[-2:])))
            outs.append(restore_labels(d[None], self.geometry[i:i + 1], mode="bilinear")[0])
        return torch.stack(outs) if self.geometry.uniform else outs

    def upsampled_labels(self, mode: str = "bilinear") -> torch.Tensor | list[torch.Tensor]:
        """The paper's baselines at each input's own size: ``low_res`` upsampled to the canvas by
        :func:`upsample_segments` (``"bilinear"`` or ``"nearest"``), then restored like ``labels``."""
        up = upsample_segments(self.low_res, tuple(self.pixels.shape[-2:]), mode)
        return restore_labels(up, self.geometry)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 30, n_init: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (greedy k-means++ initialisation, Lloyd iterations), best of ``n_init`` restarts, on x's device.

    x: (P, C) float points. Returns labels (P,) int64 and centres (k, C) in x's dtype, from the
    restart with the lowest inertia (sum of squared distances to the assigned centre). All restarts
    run together as one batched computation; distances are computed in float32 for half-precision
    input (x's dtype otherwise). The random draws come from a generator on x's device seeded with
    ``seed`` (so labels may differ between devices); nothing synchronises with the host (a fixed
    ``iters`` Lloyd steps: a converged assignment is a fixed point, so extra steps change nothing).
    """
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"kmeans expects float points of shape (P, C); got {tuple(x.shape)} {x.dtype}")
    P = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P:
        raise ValueError(f"k must be an integer in [1, {P}] (the number of points); got {k!r}")
    if n_init < 1 or iters < 0:
        raise ValueError(f"n_init must be >= 1 and iters >= 0; got n_init={n_init}, iters={iters}")
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = x.to(cdt)
    x2 = (xf * xf).sum(1)                                                              # (P,)

    def sqdist(c: torch.Tensor) -> torch.Tensor:  # c (n, m, C) -> (n, P, m) squared distances
        cx = (c @ xf.T).transpose(1, 2)  # (n, m, C) @ (C, P): one matmul, x is never copied per restart
        return (x2[None, :, None] - 2 * cx + (c * c).sum(-1)[:, None, :]).clamp_min(0)

    # greedy k-means++ (as scikit-learn): each next centre is the best of `trials` candidates, each drawn
    # with probability proportional to the squared distance to the nearest centre so far (inverse CDF:
    # the first point whose cumulative weight exceeds u * total)
    trials = 2 + int(math.log(k))
    g = torch.Generator(device=x.device).manual_seed(seed)  # drawn where x lives: no transfer, no sync
    u = torch.rand(n_init, k, trials, generator=g, device=x.device, dtype=cdt)
    first = (u[:, 0, 0] * P).long().clamp_max(P - 1)                                 # (n,)
    centres = [xf[first]]                                                             # each (n, C)
    d2 = sqdist(centres[0][:, None])[..., 0]                                          # (n, P)
    rows = torch.arange(n_init, device=x.device)
    for j in range(1, k):
        cum = d2.cumsum(1)
        cand = torch.searchsorted(cum, u[:, j] * cum[:, -1:], right=True).clamp_max(P - 1)  # (n, trials)
        dc = torch.minimum(d2[..., None], sqdist(xf[cand]))                           # (n, P, trials)
        pick = dc.sum(1).argmin(1)                                                    # (n,) lowest potential
        centres.append(xf[cand[rows, pick]])
        d2 = dc[rows, :, pick]
    c = torch.stack(centres, 1)                                                       # (n, k, C)
    ks = torch.arange(k, device=x.device)
    for _ in range(iters):
        onehot = (sqdist(c).argmin(2)[..., None] == ks).to(cdt)                       # (n, P, k)
        counts = onehot.sum(1)[..., None]                                             # (n, k, 1)
        c = torch.where(counts > 0, onehot.transpose(1, 2) @ xf / counts.clamp_min(1), c)  # empty: keep
    d = sqdist(c)
    dmin, labels = d.min(2)                                                           # (n, P)
    best = dmin.sum(1).argmin().view(1)                                               # stays on the device
    return labels.index_select(0, best)[0], c.index_select(0, best)[0].to(x.dtype)


def gaussian_blur(x: torch.Tensor, kernel: int = 5, sigma: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) float maps (reflect padding; replicate for sides <= kernel // 2)."""
    if kernel <= 1:
        return x
    r = torch.arange(kernel, device=x.device, dtype=torch.float32) - (kernel - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    w = (w / w.sum()).to(x.dtype)
    c = x.shape[1]
    pad = kernel // 2
    # reflect padding needs the side to exceed the pad (a thin image strip may not); replicate then
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), w.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), w.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class _BroadcastUpBlocks:
    """Forward pre-hooks on up blocks >= ``first``: batch-1 tensor inputs are expanded to ``batch``.

    With them the UNet runs its down path, mid block and earlier up blocks once (batch 1) and
    the rest at the full batch: the prefix shared by all modulated runs is computed once.
    """

    def __init__(self, unet, first: int, batch: int):
        self.unet, self.first, self.batch, self.handles = unet, first, batch, []

    def _expand(self, v):
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1:
            return v.expand(self.batch, *v.shape[1:])
        if isinstance(v, tuple):
            return tuple(self._expand(u) for u in v)
        return v

    def __enter__(self):
        def hook(_m, args, kwargs):
            return tuple(self._expand(a) for a in args), {k: self._expand(v) for k, v in kwargs.items()}

        for blk in list(self.unet.up_blocks)[self.first:]:
            self.handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ------------------------------------------------------------------ where the image lies on the canvas
Box = tuple[int, int, int, int]  # (y0, y1, x0, x1): rows y0..y1-1 and columns x0..x1-1 of a grid


def _token_box(g: ImageGeometry, grid: tuple[int, int]) -> Box:
    """The cells of an (h, w) grid over the canvas whose centres fall on the image (not the padding).

    An image thinner than one cell still gets the cell under its centre line.
    """
    y0, y1, x0, x1 = g.valid_box()
    out = []
    for n, lo, hi in ((grid[0], y0, y1), (grid[1], x0, x1)):
        cell = g.size / n
        first = max(0, math.ceil(lo / cell - 0.5))            # first centre (i + 0.5) * cell >= lo
        last = min(n, math.ceil(hi / cell - 0.5))             # first centre >= hi (exclusive end)
        if last <= first:
            first = min(n - 1, int((lo + hi) / 2 / cell))
            last = first + 1
        out += [first, last]
    return out[0], out[1], out[2], out[3]


def _pixel_box(g: ImageGeometry, hw: tuple[int, int]) -> Box:
    """The image's pixels on an (H, W) canvas (the canvas at ``g.size`` scaled to H x W)."""
    y0, y1, x0, x1 = g.valid_box()
    sy, sx = hw[0] / g.size, hw[1] / g.size
    return (int(y0 * sy), max(int(y0 * sy) + 1, round(y1 * sy)), int(x0 * sx), max(int(x0 * sx) + 1, round(x1 * sx)))


def _fill_outside(x: torch.Tensor, box: Box) -> torch.Tensor:
    """(..., H, W) -> the same with every cell outside ``box`` set to the nearest cell inside (edge replication)."""
    y0, y1, x0, x1 = box
    rows = torch.arange(x.shape[-2], device=x.device).clamp(y0, y1 - 1)
    cols = torch.arange(x.shape[-1], device=x.device).clamp(x0, x1 - 1)
    return x[..., rows[:, None], cols[None, :]]


def _box_mask(box: Box, hw: tuple[int, int], device) -> torch.Tensor:
    m = torch.zeros(hw, dtype=torch.bool, device=device)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def _mask_for_layer(masks: torch.Tensor, layer_is_4d: bool) -> torch.Tensor:
    """(R, h, w) masks -> what ControlledAttnProcessor adds: (R, 1, h, w) or (R, h*w, 1) tokens."""
    return masks[:, None] if layer_is_4d else masks.flatten(1)[..., None]


def _denoise_timesteps(backbone: Backbone, t_m: int, num_steps: int) -> list:
    """``t_m``, then the sampling grid's timesteps below it."""
    return [t_m] + [t for t in backbone.sampler(num_steps).timesteps.tolist() if t < t_m]


@torch.no_grad()
def _modulated_runs(backbone: Backbone, z_tm: torch.Tensor, masks: torch.Tensor, signs: torch.Tensor, lam: float,
                    timesteps: Sequence[int], mod_layer: str, suffix_layers: list[str], up_index: int,
                    inject: bool, layer_is_4d: bool) -> torch.Tensor:
    """Denoise R modulated copies of z_tm (batch 1) to x0. masks (R, h, w), signs (R,). Returns (R, C, h', w')."""
    R = masks.shape[0]
    procs = {p: ControlledAttnProcessor() for p in suffix_layers}
    add = torch.cat([torch.zeros_like(masks[:1]), masks * (signs * lam).view(-1, 1, 1).to(masks)])  # element 0: none
    procs[mod_layer].add_output = _mask_for_layer(add, layer_is_4d)
    if inject:
        for p in procs.values():
            p.inject_from = 0
    cond = backbone.empty_prompt(1)
    with AttentionProcessors(backbone.denoiser, procs):
        with _BroadcastUpBlocks(backbone.denoiser, up_index, R + 1):
            out = backbone.predict(z_tm, timesteps[0], cond)[1:]          # (R, ...) at t_m: epsilon, v or x0
    # after t_m the runs are plain denoising: the backbone's own (fused) attention processors again
    x = backbone.step(out, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm.expand(R, -1, -1, -1))
    cond_r = backbone.empty_prompt(R)
    for i, t in enumerate(timesteps[1:], start=1):
        out = backbone.predict(x, t, cond_r)
        x = backbone.step(out, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


@torch.no_grad()
def reference_modulated_run(backbone: Backbone, z_tm: torch.Tensor, mask: torch.Tensor, sign: float, lam: float,
                            timesteps: Sequence[int], mod_layer: str, inject: bool) -> torch.Tensor:
    """The straightforward way, one run: full UNet on [unmodulated, modulated] at t_m, no prefix sharing.

    Used by the tests and the benchmark as the reference the batched path must equal.
    """
    layers = [a.path for a in attention_layers(backbone)]
    procs = {p: ControlledAttnProcessor() for p in layers}
    is4d = mod_layer == next(a.block for a in attention_layers(backbone) if a.path == mod_layer)
    add = torch.stack([torch.zeros_like(mask), mask * sign * lam])
    procs[mod_layer].add_output = _mask_for_layer(add, is4d)
    if inject:
        for p in procs.values():
            p.inject_from = 0
    with AttentionProcessors(backbone.denoiser, procs):
        out = backbone.predict(z_tm.expand(2, -1, -1, -1), timesteps[0], backbone.empty_prompt(2))[1:]
    x = backbone.step(out, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm)
    for i, t in enumerate(timesteps[1:], start=1):
        out = backbone.predict(x, t, backbone.empty_prompt(1))
        x = backbone.step(out, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


class _TokenHooks:
    """Hooks on a joint (MM-DiT) attention layer: capture its image queries, or add ``add`` (R, N, 1) to its
    image output right after the output projection. Removed on exit."""

    def __init__(self, attn, capture: bool = False, add: torch.Tensor | None = None):
        self.attn, self.capture, self.add, self.query, self.handles = attn, capture, add, None, []

    def __enter__(self):
        if self.capture:
            self.handles.append(self.attn.to_q.register_forward_hook(lambda m, a, out: setattr(self, "query", out)))
        if self.add is not None:
            self.handles.append(self.attn.to_out[0].register_forward_hook(lambda m, a, out: out + self.add.to(out)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.no_grad()
def _joint_modulated_runs(backbone: Backbone, z_tm: torch.Tensor, masks: torch.Tensor, signs: torch.Tensor,
                          lam: float, timesteps: Sequence[int], mod_layer: str) -> torch.Tensor:
    """The MM-DiT analog: R runs at batch R, ``±lam * M`` added to a joint layer's image output at t_m only."""
    R = masks.shape[0]
    add = masks.flatten(1)[..., None] * (signs * lam).view(-1, 1, 1).to(masks)            # (R, N, 1)
    x, cond_r = z_tm.expand(R, -1, -1, -1), backbone.empty_prompt(R)
    with _TokenHooks(backbone.denoiser.get_submodule(mod_layer), add=add):
        out = backbone.predict(x, timesteps[0], cond_r)
    x = backbone.step(out, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, x)
    for i, t in enumerate(timesteps[1:], start=1):
        x = backbone.step(backbone.predict(x, t, cond_r), t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


def _queries(backbone: Backbone, layer: str, x_t: torch.Tensor, t) -> torch.Tensor:
    """The query vectors ``(B, N, C)`` of one attention layer (``to_q`` output, image tokens) in a pass at ``t``."""
    if layer in joint_layers(backbone):
        with _TokenHooks(backbone.denoiser.get_submodule(layer), capture=True) as cap:
            backbone.predict(x_t, t)
    else:
        cap = ControlledAttnProcessor(capture_query=True)
        with AttentionProcessors(backbone.denoiser, {layer: cap}):
            backbone.predict(x_t, t)
    return cap.query


def _default_query_layer(backbone: Backbone) -> str:
    """EmerDiff's k-means layer: the paper's low-resolution up-block layer on UNets, the middle joint layer on MM-DiTs."""
    joint = list(joint_layers(backbone))
    return joint[len(joint) // 2] if joint else low_res_query_layer(backbone).path


def joint_layers(backbone: Backbone) -> dict[str, tuple[int, int]]:
    """MM-DiT joint attention layers ``transformer_blocks.{i}.attn`` -> token grid; empty for other denoisers."""
    blocks = backbone.blocks()
    return {f"{b}.attn": info.resolution for b, info in blocks.items() if info.kind == "joint"}


def _decoded_pairs(backbone: Backbone, latents: torch.Tensor, batch: int):
    """Decode (2K, C, h, w) latents ordered [k+, k-, ...] at most ``batch`` per VAE call; yield the
    (plus, minus) image pairs, each (k, 3, H, W) float32, as they complete (a pair split by a chunk
    border waits for its partner)."""
    pending = None
    for s in range(0, latents.shape[0], batch):
        imgs = backbone.decode(latents[s:s + batch]).float()
        if pending is not None:
            imgs = torch.cat([pending, imgs])
        m = imgs.shape[0] // 2 * 2
        pending = imgs[m:] if m < imgs.shape[0] else None
        if m:
            yield imgs[0:m:2], imgs[1:m:2]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_arguments(num_segments, positions: int, q_layer: str, *, lam, num_steps, T: int, blur_kernel,
                     blur_sigma, chunk_size, decode_batch_size, kmeans_restarts) -> None:
    """Refuse bad emerdiff_segment arguments up front, each with what to pass instead."""
    if not _is_int(num_segments) or not 1 <= num_segments <= positions:
        raise ValueError(f"num_segments must be an integer in [1, {positions}] (k-means clusters the {positions} "
                         f"positions of {q_layer}); got {num_segments!r}. The paper uses 10-40.")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number (the paper uses 10); got {lam!r}")
    if not _is_int(num_steps) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, {T}] (DDIM steps; default 50); "
                         f"got {num_steps!r}")
    if not _is_int(blur_kernel) or blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be an odd integer >= 1 (1 = no blur; the paper's code uses 5); "
                         f"got {blur_kernel!r}")
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, numbers.Real) or not (
            math.isfinite(blur_sigma) and blur_sigma > 0):
        raise ValueError(f"blur_sigma must be a finite number > 0 (the paper's code uses 3); got {blur_sigma!r}")
    for name, v in (("chunk_size", chunk_size), ("decode_batch_size", decode_batch_size),
                    ("kmeans_restarts", kmeans_restarts)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")


@torch.no_grad()
def emerdiff_segment(
    backbone: Backbone,
    images,
    num_segments: int = 10,
    *,
    t_f: int = 1,
    t_m: int = 281,
    lam: float = 10.0,
    num_steps: int = 50,
    attention_injection: bool | None = None,
    query_layer: str | None = None,
    modulate_layer: str | None = None,
    blur_kernel: int = 5,
    blur_sigma: float = 3.0,
    chunk_size: int = 16,
    decode_batch_size: int = 8,
    kmeans_restarts: int = 50,
    fit: str = "pad",
    seed: int = 0,
    return_images: bool = False,
    progress: bool = True,
) -> EmerDiffResult:
    """Segment images without training (EmerDiff). See the module doc for the method and defaults.

    images: anything :meth:`Backbone.preprocess` takes (PIL / numpy / torch, any sizes, a list may mix
    them); fit: how a non-square image meets the model's square input: ``"pad"`` (default: letterbox;
    the border is not clustered, not modulated and not scored), ``"crop"`` (centre crop: the sides get
    label 255) or ``"resize"`` (stretch).
    num_segments: K of k-means (paper: 10-40; at most the number of query tokens on the image);
    t_f / t_m: k-means and modulation timesteps; lam: modulation strength (finite);
    chunk_size: modulated runs per UNet batch and decode_batch_size: images per VAE decode call (memory
    budgets: the difference maps are reduced chunk by chunk, so peak memory does not grow with K beyond
    the (K, size, size) float32 maps returned); kmeans_restarts: k-means++ initialisations, best kept;
    query_layer / modulate_layer: attention layer paths (default:
    :func:`~diffseg_utils.attention.low_res_query_layer`; on an MM-DiT (SD3, Flux, toy-sd3) a joint layer
    ``transformer_blocks.{i}.attn`` from :func:`joint_layers`, default the middle one: its image queries are
    clustered and its image output after the output projection is modulated);
    attention_injection: reuse the unmodulated pass's attention at t_m (default: on for UNets, as the
    paper; not available on joint attention); seed: the noise of image i is drawn from
    ``seed + i`` (shared by its k-means pass and all its modulated runs).

    Returns an :class:`EmerDiffResult`: ``labels`` (N, H, W) int64 and ``scores`` (N, K, H, W) float32 at
    each input's own size (lists when sizes differ), and the model-grid fields it came from.
    """
    joint = joint_layers(backbone)
    layers = [] if joint else attention_layers(backbone)
    grids = dict(joint) if joint else {a.path: a.resolution for a in layers}
    q_layer = query_layer or _default_query_layer(backbone)
    m_layer = modulate_layer or q_layer
    for name, p in (("query_layer", q_layer), ("modulate_layer", m_layer)):
        if p not in grids:
            valid = list(joint) if joint else [a.path for a in layers if a.path.startswith("up_blocks")]
            raise ValueError(f"{name} {p!r} is not an attention layer; valid: {valid}")
    if joint and attention_injection:
        raise ValueError("attention_injection is not implemented for joint (MM-DiT) attention; pass "
                         "attention_injection=False (the default on MM-DiTs)")
    attention_injection = not joint if attention_injection is None else attention_injection
    if not joint and not m_layer.startswith("up_blocks."):
        raise ValueError("modulate_layer must be inside an up block (the shared prefix is the rest of the UNet)")
    qh, qw = grids[q_layer]
    _check_arguments(num_segments, qh * qw, q_layer, lam=lam, num_steps=num_steps,
                     T=backbone.scheduler.config.num_train_timesteps, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                     chunk_size=chunk_size, decode_batch_size=decode_batch_size, kmeans_restarts=kmeans_restarts)
    if not joint:
        by_path = {a.path: a for a in layers}
        up_index = int(m_layer.split(".")[1])
        suffix = [a.path for a in layers if a.path.startswith("up_blocks.") and int(a.path.split(".")[1]) >= up_index]
        layer_is_4d = m_layer == by_path[m_layer].block  # UNet2DModel attention works on (B, C, H, W)
    backbone.check_timesteps([t_f, t_m], 2)
    x, geo = backbone.preprocess(images, fit=fit, return_geometry=True)
    h, w = grids[m_layer]
    q_boxes = [_token_box(g, (qh, qw)) for g in geo.images]
    for i, (y0, y1, x0, x1) in enumerate(q_boxes):  # refused before any UNet call
        if (y1 - y0) * (x1 - x0) < num_segments:
            raise ValueError(f"image {i} ({geo[i].height}x{geo[i].width}) covers {(y1 - y0) * (x1 - x0)} of the "
                             f"{qh}x{qw} query tokens of {q_layer} (the rest is the letterbox border), fewer than "
                             f"num_segments={num_segments}; use fewer segments, or fit='crop' to fill the canvas")
    n = x.shape[0]
    ts = _denoise_timesteps(backbone, t_m, num_steps)
    low_all, pix_all, diff_all, plus_all, minus_all = [], [], [], [], []
    evals = 0.0
    min_evals = 0
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="emerdiff", disable=not progress, leave=False):
        z0 = backbone.encode(x[i:i + 1])
        g = torch.Generator().manual_seed(seed + i)
        eps = torch.randn(z0.shape, generator=g).to(z0)
        # 1. low-resolution segments: k-means on the query vectors at t_f of the tokens on the image
        qy0, qy1, qx0, qx1 = q_boxes[i]
        q = _queries(backbone, q_layer, backbone.add_noise(z0, t_f, eps), t_f)[0]
        q = q.view(qh, qw, -1)[qy0:qy1, qx0:qx1].reshape((qy1 - qy0) * (qx1 - qx0), -1)
        labels, _ = kmeans(q, num_segments, seed=seed, n_init=kmeans_restarts)
        low = torch.zeros(qh, qw, dtype=labels.dtype, device=labels.device)
        low[qy0:qy1, qx0:qx1] = labels.view(qy1 - qy0, qx1 - qx0)
        low = _fill_outside(low, q_boxes[i])      # border tokens: the nearest image token's id (display only)
        if (qh, qw) != (h, w):  # modulated layer at another resolution: nearest-resize the segments
            low_m = F.interpolate(low[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        else:
            low_m = low
        on_image = _box_mask(_token_box(geo[i], (h, w)), (h, w), low_m.device)  # the border is never modulated
        ids = torch.unique(labels)
        masks = torch.stack([((low_m == k) & on_image).to(backbone.dtype) for k in ids])  # (K, h, w)
        # 2. all 2K modulated runs, chunked
        run_masks = masks.repeat_interleave(2, 0)                                      # k+, k-, ...
        signs = torch.tensor([1.0, -1.0], device=backbone.device).repeat(len(ids))
        z_tm = backbone.add_noise(z0, t_m, eps)
        finals = []
        for s in range(0, run_masks.shape[0], chunk_size):
            r = run_masks[s:s + chunk_size]
            if joint:
                finals.append(_joint_modulated_runs(backbone, z_tm, r, signs[s:s + chunk_size], lam, ts, m_layer))
                evals += r.shape[0] * len(ts)
            else:
                finals.append(_modulated_runs(backbone, z_tm, r, signs[s:s + chunk_size], lam, ts, m_layer,
                                              suffix, up_index, attention_injection, layer_is_4d))
                evals += 1 + r.shape[0] * len(ts)
        evals += 1  # the t_f pass
        min_evals += (1 if joint else 2) + 2 * len(ids) * len(ts)  # t_f pass, unmodulated reference (UNets), 2K runs
        # 3. pixel assignment over the image's pixels, reduced as the decoded pairs come (peak memory
        # independent of K); blur and max-normalisation see the image only, never the border
        ds, plus_l, minus_l = [], [], []
        box = None
        for plus, minus in _decoded_pairs(backbone, torch.cat(finals), decode_batch_size):
            H, W = plus.shape[-2:]
            box = box or _pixel_box(geo[i], (H, W))
            y0, y1, x0, x1 = box
            d = (minus - plus)[..., y0:y1, x0:x1].pow(2).sum(1, keepdim=True).sqrt()  # (k, 1, h_img, w_img)
            d = gaussian_blur(d, blur_kernel, blur_sigma)[:, 0]
            d = d / d.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
            ds.append(F.pad(d, (x0, W - x1, y0, H - y1)))                              # zeros on the border
            if return_images:
                plus_l.append(plus)
                minus_l.append(minus)
        d = torch.cat(ds)                                                              # (K, H, W)
        low_all.append(low)
        pix_all.append(_fill_outside(ids[d.argmax(0)], box))
        full = torch.zeros(num_segments, *d.shape[1:], device=d.device)
        full[ids] = d
        diff_all.append(full)
        if return_images:
            plus, minus = torch.cat(plus_l), torch.cat(minus_l)
            P = torch.zeros(num_segments, *plus.shape[1:], device=plus.device)
            M = torch.zeros_like(P)
            P[ids], M[ids] = plus, minus
            plus_all.append(P)
            minus_all.append(M)
    secs = (time.perf_counter() - t0) / n
    pixels = torch.stack(pix_all)
    return EmerDiffResult(
        low_res=torch.stack(low_all), pixels=pixels, diffs=torch.stack(diff_all),
        labels=restore_labels(pixels, geo), geometry=geo, layer=m_layer,
        denoiser_evals_per_image=evals / n, min_denoiser_evals_per_image=min_evals / n,
        seconds_per_image=secs, images_plus=torch.stack(plus_all) if return_images else None,
        images_minus=torch.stack(minus_all) if return_images else None,
        extra={"timesteps": ts, "query_layer": q_layer, "kmeans_restarts": kmeans_restarts, "fit": fit})


def upsample_segments(low_res: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Baselines: upsample low-res segment ids to pixels — "nearest" copies ids; "bilinear" upsamples
    each segment's one-hot mask bilinearly and takes the argmax (the paper's bilinear baseline)."""
    if mode == "nearest":
        return F.interpolate(low_res[:, None].float(), size=size, mode="nearest")[:, 0].long()
    k = int(low_res.max()) + 1
    onehot = F.one_hot(low_res.long(), k).permute(0, 3, 1, 2).float()
    return F.interpolate(onehot, size=size, mode="bilinear", align_corners=False).argmax(1)


# ------------------------------------------------------------------ scoring, baselines, the validation choice
def hungarian_mious(preds, gts, ignore_index: int | None = 255) -> np.ndarray:
    """Per-image :func:`~diffseg_utils.metrics.hungarian_miou` (segments matched one-to-one to ground-truth
    classes per image), the lenient protocol for unlabelled segments: ``(N,)`` float64 on the host.

    preds: (N, H, W) integer segment ids or a list of (H_i, W_i) maps (e.g. ``EmerDiffResult.labels``);
    gts: the ground truth, each map at its prediction's size (numpy or torch). Raises ValueError when a
    pair differs in size (a model-grid prediction against an image-size ground truth: use ``.labels``).
    """
    from .metrics import hungarian_miou

    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"got {len(preds)} predictions and {len(gts)} ground-truth maps; need the same number, >= 1")
    scores = []
    for i, (p, g) in enumerate(zip(preds, gts)):
        p = p.cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        g = g.cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        if p.shape != g.shape:
            raise ValueError(f"image {i}: prediction {p.shape} and ground truth {g.shape} differ in size; score "
                             "predictions at the ground truth's size (EmerDiffResult.labels, restore_labels)")
        scores.append(hungarian_miou(p, g, ignore_index))
    return np.asarray(scores)


def mean_hungarian_miou(preds, gts, ignore_index: int | None = 255) -> float:
    """Mean over images of :func:`hungarian_mious`."""
    return float(np.mean(hungarian_mious(preds, gts, ignore_index)))


@torch.no_grad()
def kmeans_upsampled_features(backbone: Backbone, images, num_segments: int = 10, *, t_f: int = 1,
                              query_layer: str | None = None, fit: str = "pad", seed: int = 0,
                              kmeans_restarts: int = 10, progress: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Baseline: k-means on EmerDiff's own query vectors upsampled (bilinear) to pixels, per image.

    Same features, noise (``seed + i``) and image placement as :func:`emerdiff_segment`'s k-means step,
    but clustered at pixel resolution: what pixel-level k-means on the features gives without the
    modulation. Only the image's pixels are clustered (not a letterbox border). Cost: k-means over
    every pixel, (pixels) x (query channels) x K x ``kmeans_restarts`` per Lloyd step, hence fewer
    restarts than EmerDiff's 50 on its few tokens (64 px toy images: 0.35 s per image on one CPU
    thread with 10). Memory: the upsampled map, (pixels) x (query channels) float32, per image.

    Returns (N, H, W) int64 segment ids at each input's own size (a list when sizes differ).
    """
    joint = joint_layers(backbone)
    grids = dict(joint) if joint else {a.path: a.resolution for a in attention_layers(backbone)}
    q_layer = query_layer or _default_query_layer(backbone)
    if q_layer not in grids:
        raise ValueError(f"query_layer {q_layer!r} is not an attention layer of this denoiser; valid: {list(grids)}")
    qh, qw = grids[q_layer]
    x, geo = backbone.preprocess(images, fit=fit, return_geometry=True)
    size = tuple(x.shape[-2:])
    out = []
    for i in tqdm(range(x.shape[0]), desc="k-means on upsampled features", disable=not progress, leave=False):
        z0 = backbone.encode(x[i:i + 1])
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + i)).to(z0)
        q = _queries(backbone, q_layer, backbone.add_noise(z0, t_f, eps), t_f)[0]
        q = q.float().T.reshape(1, -1, qh, qw)                                          # (1, C, qh, qw)
        y0, y1, x0, x1 = box = _pixel_box(geo[i], size)
        up = F.interpolate(q, size=size, mode="bilinear", align_corners=False)[0, :, y0:y1, x0:x1]
        if (y1 - y0) * (x1 - x0) < num_segments:
            raise ValueError(f"image {i} covers {(y1 - y0) * (x1 - x0)} pixels, fewer than num_segments={num_segments}")
        labels, _ = kmeans(up.flatten(1).T.contiguous(), num_segments, seed=seed, n_init=kmeans_restarts)
        full = torch.zeros(size, dtype=labels.dtype, device=labels.device)
        full[y0:y1, x0:x1] = labels.view(y1 - y0, x1 - x0)
        out.append(_fill_outside(full, box))
    return restore_labels(torch.stack(out), geo)


def _resolve_layer(backbone: Backbone, name: str, query_layer: str | None) -> str | None:
    if name == "query":
        return query_layer or _default_query_layer(backbone)
    if name == "finer":  # UNets only: a DiT has one token grid
        f = None if joint_layers(backbone) else finer_up_layer(backbone)
        return f.path if f is not None else None
    return name


def choose_emerdiff_settings(backbone: Backbone, images, labels, num_segments: int = 10, *,
                             lams: Sequence[float] = (10.0,), layers: Sequence[str] = ("query",),
                             t_ms: Sequence[int] = (281,), ignore_index: int | None = 255, progress: bool = True,
                             **settings) -> tuple[dict, dict[tuple[str, float, int], float]]:
    """Choose EmerDiff's modulation strength ``lam``, modulated layer and modulation timestep ``t_m`` on
    labelled validation images.

    Runs :func:`emerdiff_segment` once per (layer, lam) at ``t_ms[0]``, then with the best of those once per
    further ``t_ms`` (a coordinate-wise search: the paper fixes 281 and finds 281-481 best), with ``settings``
    (any of its other keyword arguments: t_f, num_steps, seed, fit, ...), and scores ``.labels`` against
    ``labels`` with :func:`mean_hungarian_miou`.

    images / labels: validation images and their ground-truth maps, each at its image's own size.
    layers: attention layer paths, or ``"query"`` (the k-means layer, the paper's choice) and
    ``"finer"`` (the first layer of the next finer up level; skipped when there is none).

    Returns ``(best, table)``: ``best`` = ``{"lam": float, "modulate_layer": path, "t_m": int}``, ready to pass
    on with ``**best``; ``table[(layer name as given, lam, t_m)]`` = mean Hungarian mIoU. Ties go to the
    earlier entry in the order given.
    """
    taken = sorted({"lam", "modulate_layer", "t_m", "progress", "return_images"} & set(settings))
    if taken:
        raise ValueError(f"{taken} are chosen or set by choose_emerdiff_settings itself; pass lams= / layers= / t_ms=")
    if not lams or not layers or not t_ms:
        raise ValueError("give at least one candidate in lams=, layers= and t_ms=")
    resolved = {name: _resolve_layer(backbone, name, settings.get("query_layer")) for name in layers}
    resolved = {k: v for k, v in resolved.items() if v is not None}
    if not resolved:
        raise ValueError(f"none of the layers {list(layers)} exists in this UNet; use 'query' or a layer path")
    table: dict[tuple[str, float, int], float] = {}
    runs = [(name, float(lam), int(t_ms[0])) for name in resolved for lam in lams]
    bar = tqdm(total=len(runs) + len(t_ms) - 1, desc="validation: lam x layer, then t_m", disable=not progress,
               leave=False)

    def score(name: str, lam: float, t_m: int) -> None:
        r = emerdiff_segment(backbone, images, num_segments, lam=lam, modulate_layer=resolved[name], t_m=t_m,
                             progress=False, **settings)
        table[(name, lam, t_m)] = mean_hungarian_miou(r.labels, labels, ignore_index)
        bar.update()

    for run in runs:
        score(*run)
    name, lam, _ = max(table, key=table.get)  # the first maximum in insertion order
    for t_m in t_ms[1:]:
        score(name, lam, int(t_m))
    bar.close()
    best = max(table, key=table.get)
    return {"lam": best[1], "modulate_layer": resolved[best[0]], "t_m": best[2]}, table
