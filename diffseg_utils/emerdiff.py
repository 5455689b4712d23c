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
(from VidSeg's code). Our choices: ``num_inference_steps=50`` (DDIM, eta 0: the schedule
below ``t_m``, any ``prediction_type``, see :func:`~diffseg_utils.sampling.ddim_step`), k-means
as the best of 50 greedy k-means++ restarts with 30 Lloyd iterations (batched on the device), and the
first attention layer of the chosen level as the modulated layer (the paper found the three
16x16 layers similar). The 2K modulated images are decoded ``decode_batch_size`` at a time and
reduced to difference maps on the fly.
``modulate_layer`` may sit at a finer up level than the k-means layer (the segments are then
nearest-resized to it); notebook 03 compares both, and several lam, on validation images.
"""
from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import ControlledAttnProcessor, attention_layers, low_res_query_layer
from .backbones import Backbone
from .hooks import AttentionProcessors
from .sampling import ddim_step


@dataclass
class EmerDiffResult:
    """Per image: ``low_res`` (N, h, w) k-means ids; ``pixels`` (N, H, W) segment ids (same ids);
    ``diffs`` (N, K, H, W) blurred, max-normalised difference maps; optional modulated images."""

    low_res: torch.Tensor
    pixels: torch.Tensor
    diffs: torch.Tensor
    layer: str
    unet_evals_per_image: float
    min_unet_evals_per_image: float
    seconds_per_image: float
    images_plus: torch.Tensor | None = None    # (N, K, 3, H, W) in [-1, 1]
    images_minus: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


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
    """Separable Gaussian blur of (B, C, H, W) maps, reflect padding."""
    if kernel <= 1:
        return x
    r = torch.arange(kernel, device=x.device, dtype=torch.float32) - (kernel - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    w = (w / w.sum()).to(x.dtype)
    c = x.shape[1]
    pad = kernel // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), w.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), w.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


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


def _mask_for_layer(masks: torch.Tensor, layer_is_4d: bool) -> torch.Tensor:
    """(R, h, w) masks -> what ControlledAttnProcessor adds: (R, 1, h, w) or (R, h*w, 1) tokens."""
    return masks[:, None] if layer_is_4d else masks.flatten(1)[..., None]


def _denoise_timesteps(backbone: Backbone, t_m: int, num_inference_steps: int) -> tuple[object, list[int]]:
    sched = backbone.ddim_scheduler()
    sched.set_timesteps(num_inference_steps, device=backbone.device)
    return sched, [t_m] + [int(t) for t in sched.timesteps if int(t) < t_m]


@torch.no_grad()
def _modulated_runs(backbone: Backbone, z_tm: torch.Tensor, masks: torch.Tensor, signs: torch.Tensor, lam: float,
                    timesteps: Sequence[int], sched, mod_layer: str, suffix_layers: list[str], up_index: int,
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
    with AttentionProcessors(backbone.unet, procs):
        with _BroadcastUpBlocks(backbone.unet, up_index, R + 1):
            out = backbone.unet_forward(z_tm, timesteps[0], cond)[1:]          # (R, ...) at t_m: epsilon, v or x0
    # after t_m the runs are plain denoising: the backbone's own (fused) attention processors again
    x = ddim_step(sched, out, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm.expand(R, -1, -1, -1))
    cond_r = backbone.empty_prompt(R)
    for i, t in enumerate(timesteps[1:], start=1):
        out = backbone.unet_forward(x, t, cond_r)
        x = ddim_step(sched, out, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


@torch.no_grad()
def reference_modulated_run(backbone: Backbone, z_tm: torch.Tensor, mask: torch.Tensor, sign: float, lam: float,
                            timesteps: Sequence[int], sched, mod_layer: str, inject: bool) -> torch.Tensor:
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
    with AttentionProcessors(backbone.unet, procs):
        out = backbone.unet_forward(z_tm.expand(2, -1, -1, -1), timesteps[0], backbone.empty_prompt(2))[1:]
    x = ddim_step(sched, out, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm)
    for i, t in enumerate(timesteps[1:], start=1):
        out = backbone.unet_forward(x, t, backbone.empty_prompt(1))
        x = ddim_step(sched, out, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


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


def _check_arguments(num_segments, positions: int, q_layer: str, *, lam, num_inference_steps, T: int, blur_kernel,
                     blur_sigma, chunk_size, decode_batch_size, kmeans_restarts) -> None:
    """Refuse bad emerdiff_segment arguments up front, each with what to pass instead."""
    if not _is_int(num_segments) or not 1 <= num_segments <= positions:
        raise ValueError(f"num_segments must be an integer in [1, {positions}] (k-means clusters the {positions} "
                         f"positions of {q_layer}); got {num_segments!r}. The paper uses 10-40.")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number (the paper uses 10); got {lam!r}")
    if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (DDIM steps; default 50); "
                         f"got {num_inference_steps!r}")
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
    num_inference_steps: int = 50,
    attention_injection: bool = True,
    query_layer: str | None = None,
    modulate_layer: str | None = None,
    blur_kernel: int = 5,
    blur_sigma: float = 3.0,
    chunk_size: int = 16,
    decode_batch_size: int = 8,
    kmeans_restarts: int = 50,
    seed: int = 0,
    return_images: bool = False,
    progress: bool = True,
) -> EmerDiffResult:
    """Segment images without training (EmerDiff). See the module doc for the method and defaults.

    images: anything :meth:`Backbone.preprocess` takes; num_segments: K of k-means (paper: 10-40;
    at most the query layer's h*w positions); t_f / t_m: k-means and modulation timesteps; lam:
    modulation strength (finite); chunk_size: modulated runs per UNet batch and decode_batch_size:
    images per VAE decode call (memory budgets: the difference maps are reduced chunk by chunk,
    so peak memory does not grow with K beyond the (K, H, W) float32 maps returned);
    kmeans_restarts: k-means++ initialisations, best kept; query_layer / modulate_layer: attention
    layer paths (default: :func:`~diffseg_utils.attention.low_res_query_layer`).
    """
    layers = attention_layers(backbone)
    by_path = {a.path: a for a in layers}
    q_layer = query_layer or low_res_query_layer(backbone).path
    m_layer = modulate_layer or q_layer
    for name, p in (("query_layer", q_layer), ("modulate_layer", m_layer)):
        if p not in by_path:
            raise ValueError(f"{name} {p!r} is not an attention layer; valid: {[a.path for a in layers if a.path.startswith('up_blocks')]}")
    if not m_layer.startswith("up_blocks."):
        raise ValueError("modulate_layer must be inside an up block (the shared prefix is the rest of the UNet)")
    qh, qw = by_path[q_layer].resolution
    _check_arguments(num_segments, qh * qw, q_layer, lam=lam, num_inference_steps=num_inference_steps,
                     T=backbone.scheduler.config.num_train_timesteps, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                     chunk_size=chunk_size, decode_batch_size=decode_batch_size, kmeans_restarts=kmeans_restarts)
    up_index = int(m_layer.split(".")[1])
    suffix = [a.path for a in layers if a.path.startswith("up_blocks.") and int(a.path.split(".")[1]) >= up_index]
    layer_is_4d = m_layer == by_path[m_layer].block  # UNet2DModel attention works on (B, C, H, W)
    backbone.check_timesteps([t_f, t_m], 2)
    x = backbone.preprocess(images)
    n = x.shape[0]
    sched, ts = _denoise_timesteps(backbone, t_m, num_inference_steps)
    h, w = by_path[m_layer].resolution
    low_all, pix_all, diff_all, plus_all, minus_all = [], [], [], [], []
    evals = 0.0
    min_evals = 0
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="emerdiff", disable=not progress, leave=False):
        z0 = backbone.encode(x[i:i + 1])
        g = torch.Generator().manual_seed(seed + i)
        eps = torch.randn(z0.shape, generator=g).to(z0)
        # 1. low-resolution segments from the query vectors at t_f
        cap = ControlledAttnProcessor(capture_query=True)
        with AttentionProcessors(backbone.unet, {q_layer: cap}):
            backbone.unet_forward(backbone.add_noise(z0, t_f, eps), t_f)
        labels, _ = kmeans(cap.query[0], num_segments, seed=seed, n_init=kmeans_restarts)
        low = labels.view(qh, qw)
        if (qh, qw) != (h, w):  # modulated layer at another resolution: nearest-resize the segments
            low_m = F.interpolate(low[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        else:
            low_m = low
        ids = torch.unique(low)
        masks = torch.stack([(low_m == k).to(backbone.dtype) for k in ids])           # (K, h, w)
        # 2. all 2K modulated runs, chunked
        run_masks = masks.repeat_interleave(2, 0)                                      # k+, k-, ...
        signs = torch.tensor([1.0, -1.0], device=backbone.device).repeat(len(ids))
        z_tm = backbone.add_noise(z0, t_m, eps)
        finals = []
        for s in range(0, run_masks.shape[0], chunk_size):
            r = run_masks[s:s + chunk_size]
            finals.append(_modulated_runs(backbone, z_tm, r, signs[s:s + chunk_size], lam, ts, sched, m_layer,
                                          suffix, up_index, attention_injection, layer_is_4d))
            evals += 1 + r.shape[0] * len(ts)
        evals += 1  # the t_f pass
        min_evals += 2 + 2 * len(ids) * len(ts)  # t_f pass, unmodulated reference, 2K runs
        # 3. pixel assignment, reduced as the decoded pairs come (peak memory independent of K)
        ds, plus_l, minus_l = [], [], []
        for plus, minus in _decoded_pairs(backbone, torch.cat(finals), decode_batch_size):
            d = (minus - plus).pow(2).sum(1, keepdim=True).sqrt()                     # (k, 1, H, W)
            d = gaussian_blur(d, blur_kernel, blur_sigma)[:, 0]
            ds.append(d / d.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1))
            if return_images:
                plus_l.append(plus)
                minus_l.append(minus)
        d = torch.cat(ds)                                                              # (K, H, W)
        low_all.append(low)
        pix_all.append(ids[d.argmax(0)])
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
    return EmerDiffResult(
        low_res=torch.stack(low_all), pixels=torch.stack(pix_all), diffs=torch.stack(diff_all), layer=m_layer,
        unet_evals_per_image=evals / n, min_unet_evals_per_image=min_evals / n,
        seconds_per_image=secs, images_plus=torch.stack(plus_all) if return_images else None,
        images_minus=torch.stack(minus_all) if return_images else None,
        extra={"timesteps": ts, "query_layer": q_layer, "kmeans_restarts": kmeans_restarts})


def upsample_segments(low_res: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Baselines: upsample low-res segment ids to pixels — "nearest" copies ids; "bilinear" upsamples
    each segment's one-hot mask bilinearly and takes the argmax (the paper's bilinear baseline)."""
    if mode == "nearest":
        return F.interpolate(low_res[:, None].float(), size=size, mode="nearest")[:, 0].long()
    k = int(low_res.max()) + 1
    onehot = F.one_hot(low_res.long(), k).permute(0, 3, 1, 2).float()
    return F.interpolate(onehot, size=size, mode="bilinear", align_corners=False).argmax(1)
