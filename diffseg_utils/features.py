"""Diffusion features: UNet block outputs at chosen noise levels, and lazy per-pixel sampling.

DDPM-Seg upsamples every block output to image size and concatenates them (t outer, block
inner) — 8448 x 256 x 256 floats per image for its ADM setting. :class:`FeatureMaps` keeps
the maps at their own low resolution and :meth:`FeatureMaps.sample` bilinearly interpolates
only the requested pixels: numerically the same numbers as ``F.interpolate(mode="bilinear",
align_corners=False)`` followed by indexing, without the full-resolution tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbones import Backbone, adm_output_block


@dataclass
class FeatureMaps:
    """Block outputs per (timestep, block) at their native resolution.

    ``maps[(t, block)]`` is ``(N, C, h, w)`` on the backbone's device in a compact dtype;
    ``image_size`` is the (H, W) pixel grid the features describe. Iteration order — and the
    channel order of :meth:`sample` / :meth:`dense` — is t outer, block inner, as in DDPM-Seg.
    """

    maps: dict[tuple[int, str], torch.Tensor]
    image_size: tuple[int, int]
    timesteps: list[int] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)

    def __post_init__(self):
        # channels-last storage (same shape and bytes): a pixel's C values are contiguous, so
        # :meth:`sample` gathers whole rows instead of C strided reads
        self.maps = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                     for k, v in self.maps.items()}
        if not self.timesteps:
            self.timesteps = list(dict.fromkeys(t for t, _ in self.maps))
        if not self.blocks:
            self.blocks = list(dict.fromkeys(b for _, b in self.maps))

    @property
    def keys(self) -> list[tuple[int, str]]:
        return [(t, b) for t in self.timesteps for b in self.blocks]

    @property
    def num_images(self) -> int:
        return next(iter(self.maps.values())).shape[0]

    @property
    def channels(self) -> int:
        """Total feature dimension of :meth:`sample`."""
        return sum(self.maps[k].shape[1] for k in self.keys)

    @property
    def device(self) -> torch.device:
        return next(iter(self.maps.values())).device

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.maps.values())

    def select(self, blocks: Sequence[str] | None = None, timesteps: Sequence[int] | None = None) -> "FeatureMaps":
        """A view with a subset of blocks and/or timesteps (no copy)."""
        blocks = list(blocks) if blocks is not None else self.blocks
        timesteps = list(timesteps) if timesteps is not None else self.timesteps
        missing = [(t, b) for t in timesteps for b in blocks if (t, b) not in self.maps]
        if missing:
            raise KeyError(f"not extracted: {missing[:4]}; have timesteps {self.timesteps} and blocks {self.blocks}")
        return FeatureMaps({(t, b): self.maps[(t, b)] for t in timesteps for b in blocks}, self.image_size,
                           timesteps, blocks)

    def images(self, index: Sequence[int] | torch.Tensor | slice) -> "FeatureMaps":
        """A FeatureMaps of some images only."""
        return FeatureMaps({k: v[index] for k, v in self.maps.items()}, self.image_size, self.timesteps, self.blocks)

    def sample(self, img: torch.Tensor, y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-pixel features ``(M, C)`` at pixels ``(img[m], y[m], x[m])`` of the ``image_size`` grid.

        Bilinear interpolation from each low-resolution map, exactly as
        ``F.interpolate(map, size=image_size, mode="bilinear", align_corners=False)[img, :, y, x]``.
        """
        dev = self.device
        img, y, x = (v.to(dev).long().reshape(-1) for v in (img, y, x))
        H, W = self.image_size
        out = torch.empty(img.numel(), self.channels, device=dev, dtype=dtype)
        col = 0
        cache: dict[tuple[int, int], tuple] = {}
        for k in self.keys:
            m = self.maps[k]
            c, h, w = m.shape[1:]
            if (h, w) not in cache:
                y0, y1, x0, x1, wy, wx = _bilinear_taps(y, x, H, W, h, w)
                r0, r1 = (img * h + y0) * w, (img * h + y1) * w
                cache[(h, w)] = (torch.cat([r0 + x0, r0 + x1, r1 + x0, r1 + x1]),   # the 4 taps' rows
                                 torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx]))
            idx, wts = cache[(h, w)]
            # gather whole channel rows in the storage dtype (a view when channels-last), blend in float32
            rows = m.permute(0, 2, 3, 1).reshape(-1, c)
            v = rows.index_select(0, idx).view(4, -1, c).float()
            out[:, col:col + c] = v.mul_(wts).sum(0).to(dtype)  # v is a fresh gather: scale in place
            col += c
        return out

    def dense(self, index: Sequence[int] | slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All features upsampled to ``image_size``: ``(N, C, H, W)`` — DDPM-Seg's layout; small images only."""
        sel = self.images(index) if index is not None else self
        ups = [F.interpolate(sel.maps[k].to(dtype), size=self.image_size, mode="bilinear", align_corners=False)
               for k in self.keys]
        return torch.cat(ups, 1)


def _bilinear_taps(y, x, H, W, h, w):
    """Source indices and weights of PyTorch's bilinear resize (align_corners=False) for output pixels."""
    def axis(p, n_out, n_in):
        scale = n_in / n_out
        src = ((p.float() + 0.5) * scale - 0.5).clamp_min(0)
        i0 = src.floor().long().clamp_max(n_in - 1)
        i1 = (i0 + 1).clamp_max(n_in - 1)
        return i0, i1, (src - i0.float())[:, None]

    y0, y1, wy = axis(y, H, h)
    x0, x1, wx = axis(x, W, w)
    return y0, y1, x0, x1, wy, wx


def resolve_blocks(backbone: Backbone, blocks: Sequence[str | int]) -> list[str]:
    """Block names as given, with ints read as ADM ``output_blocks`` indices; unknown names raise."""
    valid = backbone.blocks()
    out = []
    for b in blocks:
        name = adm_output_block(backbone.denoiser, b) if isinstance(b, int) else b
        if name not in valid:
            raise ValueError(f"unknown block {b!r}. Valid names (backbone.blocks()) include "
                             f"{backbone.feature_blocks()}; all: {len(valid)} names, e.g. {list(valid)[:3]}")
        out.append(name)
    return out


def make_noise(backbone: Backbone, n: int, mode: str | torch.Tensor = "shared", seed: int = 0,
               offset: int = 0) -> torch.Tensor:
    """Noise for n images in the UNet's input space.

    ``"shared"``: DDPM-Seg's rule, one eps drawn from ``seed`` and reused for every image (and t);
    ``"per_image"``: image ``offset + i`` gets its own eps from ``(seed, offset + i)``, independent
    of batching; a tensor is used as given (broadcast over images when its batch is 1).
    """
    shape = (backbone.latent_channels, backbone.latent_resolution, backbone.latent_resolution)
    if isinstance(mode, torch.Tensor):
        eps = mode.to(backbone.device, backbone.dtype)
        if eps.ndim == 3:
            eps = eps[None]
        if eps.shape[1:] != shape:
            raise ValueError(f"noise must have shape (1 or N, {', '.join(map(str, shape))}); got {tuple(eps.shape)}")
        return eps.expand(n, *shape) if eps.shape[0] == 1 else eps[offset:offset + n]
    if mode == "shared":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, *shape, generator=g).to(backbone.device, backbone.dtype).expand(n, *shape)
    if mode == "per_image":
        eps = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i))
               for i in range(n)]
        return torch.stack(eps).to(backbone.device, backbone.dtype)
    raise ValueError(f"noise must be 'shared', 'per_image' or a tensor; got {mode!r}")


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    images,
    blocks: Sequence[str | int],
    timesteps: Sequence[int],
    *,
    noise: str | torch.Tensor = "shared",
    seed: int = 0,
    num_noise: int = 1,
    prompt: str | Sequence[str] = "",
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
    size: int | None = None,
    progress: bool = True,
) -> FeatureMaps:
    """UNet block outputs for ``images`` at each timestep, as a :class:`FeatureMaps`.

    images:    anything :func:`~diffseg_utils.inputs.prepare_images` takes (resized to ``size``,
               default the backbone's native resolution).
    blocks:    names from ``backbone.blocks()``; ints are ADM ``output_blocks`` indices.
    timesteps: forward-process steps t (0 = clean); all of them run in one UNet call per batch.
    noise:     "shared" (DDPM-Seg: one eps from ``seed`` for all images and t), "per_image", or a tensor.
    num_noise: average the features over this many noise draws (seeds seed, seed+1, ...).
    prompt:    text condition for conditional UNets ("" = unconditional, DDPM-Seg's setting).
    dtype:     storage dtype of the maps (fp16 default; fp32 for exact work).
    """
    names = resolve_blocks(backbone, blocks)
    ts = [int(t) for t in timesteps]
    backbone.check_timesteps(ts, len(ts))
    if not ts:
        raise ValueError("timesteps is empty; give at least one, e.g. [50, 150, 250]")
    x = backbone.preprocess(images, size=size)
    n = x.shape[0]
    parts: dict[tuple[int, str], list[torch.Tensor]] = {(t, b): [] for t in ts for b in names}
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} images")
    T = len(ts)
    t_vec = torch.tensor(ts, device=backbone.device)
    bar = tqdm(range(0, n, batch_size), desc="features", disable=not progress, leave=False)
    with backbone.capture(names) as cap:
        for s in bar:
            xb = x[s:s + batch_size]
            b = xb.shape[0]
            z0 = backbone.encode(xb)
            cond = None
            if backbone.is_conditional:
                cond = (backbone.empty_prompt(b) if all(p == "" for p in prompts[s:s + b])
                        else backbone.encode_prompt(prompts[s:s + b]))
                cond = cond.repeat(T)  # T*b rows, t outer
            acc: dict[str, torch.Tensor] = {}
            for k in range(num_noise):
                eps = make_noise(backbone, b, noise, seed + k, offset=s)
                zt = backbone.add_noise(z0.repeat(T, 1, 1, 1), t_vec.repeat_interleave(b), eps.repeat(T, 1, 1, 1))
                backbone.predict(zt, t_vec.repeat_interleave(b), cond)
                for name in names:
                    o = cap.outputs[name].float() if num_noise > 1 else cap.outputs[name]
                    acc[name] = o if k == 0 else acc[name] + o
            for name in names:
                o = (acc[name] / num_noise) if num_noise > 1 else acc[name]
                o = o.reshape(T, b, *o.shape[1:]).to(dtype)
                for i, t in enumerate(ts):
                    parts[(t, name)].append(o[i])
    maps = {k: torch.cat(v) for k, v in parts.items()}
    return FeatureMaps(maps, (x.shape[-2], x.shape[-1]), ts, names)
