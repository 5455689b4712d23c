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
below ``t_m``), k-means++ with 30 Lloyd iterations, and the first attention layer of the
chosen level as the modulated layer (the paper found the three 16x16 layers similar).
``modulate_layer`` may sit at a finer up level than the k-means layer (the segments are then
nearest-resized to it); notebook 03 compares both, and several lam, on validation images.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import ControlledAttnProcessor, attention_layers, low_res_query_layer
from .backbones import Backbone
from .hooks import AttentionProcessors


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


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ initialisation, in torch on x's device. x: (P, C) -> labels (P,), centres (k, C)."""
    x = x.float()
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.cpu().double()
        idx = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else int(torch.randint(n, (1,), generator=g))
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float().unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, c


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


def _ddim_step(sched, eps, t: int, t_prev: int | None, x):
    """One deterministic DDIM step from t to t_prev (None = to x0), using the scheduler's alphas."""
    a_t = sched.alphas_cumprod[t].to(x)
    a_p = sched.alphas_cumprod[t_prev].to(x) if t_prev is not None else torch.ones((), dtype=x.dtype, device=x.device)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps


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
            eps = backbone.unet_forward(z_tm, timesteps[0], cond)[1:]          # (R, ...) at t_m
    # after t_m the runs are plain denoising: the backbone's own (fused) attention processors again
    x = _ddim_step(sched, eps, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm.expand(R, -1, -1, -1))
    cond_r = backbone.empty_prompt(R)
    for i, t in enumerate(timesteps[1:], start=1):
        eps = backbone.unet_forward(x, t, cond_r)
        x = _ddim_step(sched, eps, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
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
        eps = backbone.unet_forward(z_tm.expand(2, -1, -1, -1), timesteps[0], backbone.empty_prompt(2))[1:]
    x = _ddim_step(sched, eps, timesteps[0], timesteps[1] if len(timesteps) > 1 else None, z_tm)
    for i, t in enumerate(timesteps[1:], start=1):
        eps = backbone.unet_forward(x, t, backbone.empty_prompt(1))
        x = _ddim_step(sched, eps, t, timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x


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
    seed: int = 0,
    return_images: bool = False,
    progress: bool = True,
) -> EmerDiffResult:
    """Segment images without training (EmerDiff). See the module doc for the method and defaults.

    images: anything :meth:`Backbone.preprocess` takes; num_segments: K of k-means (paper: 10-40);
    t_f / t_m: k-means and modulation timesteps; lam: modulation strength; chunk_size: modulated
    runs per UNet batch (memory budget); query_layer / modulate_layer: attention layer paths
    (default: :func:`~diffseg_utils.attention.low_res_query_layer`).
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
    up_index = int(m_layer.split(".")[1])
    suffix = [a.path for a in layers if a.path.startswith("up_blocks.") and int(a.path.split(".")[1]) >= up_index]
    layer_is_4d = m_layer == by_path[m_layer].block  # UNet2DModel attention works on (B, C, H, W)
    backbone.check_timesteps([t_f, t_m], 2)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
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
        qh, qw = by_path[q_layer].resolution
        labels, _ = kmeans(cap.query[0], num_segments, seed=seed)
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
        imgs = backbone.decode(torch.cat(finals)).float()                              # (2K, 3, H, W)
        plus, minus = imgs[0::2], imgs[1::2]
        # 3. pixel assignment
        d = (minus - plus).pow(2).sum(1, keepdim=True).sqrt()                         # (K, 1, H, W)
        d = gaussian_blur(d, blur_kernel, blur_sigma)[:, 0]
        d = d / d.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
        low_all.append(low)
        pix_all.append(ids[d.argmax(0)])
        full = torch.zeros(num_segments, *d.shape[1:], device=d.device)
        full[ids] = d
        diff_all.append(full)
        if return_images:
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
        extra={"timesteps": ts, "query_layer": q_layer})


def upsample_segments(low_res: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Baselines: upsample low-res segment ids to pixels — "nearest" copies ids; "bilinear" upsamples
    each segment's one-hot mask bilinearly and takes the argmax (the paper's bilinear baseline)."""
    if mode == "nearest":
        return F.interpolate(low_res[:, None].float(), size=size, mode="nearest")[:, 0].long()
    k = int(low_res.max()) + 1
    onehot = F.one_hot(low_res.long(), k).permute(0, 3, 1, 2).float()
    return F.interpolate(onehot, size=size, mode="bilinear", align_corners=False).argmax(1)
