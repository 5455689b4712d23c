"""One interface over diffusers backbones: Stable Diffusion (latent) and DDPM/ADM (pixel) UNets.

>>> bb = load_backbone("toy")                     # or "sd-1.5", "ddpm-bedroom", a directory, a hub id
>>> x = bb.preprocess(pil_images)                # (N, 3, R, R) in [-1, 1]
>>> z = bb.encode(x)                             # latents (VAE, scaled) or x itself (pixel models)
>>> cond = bb.encode_prompt([""] * len(z))       # (N, L, D) text embeddings, or None (unconditional)
>>> eps = bb.unet_forward(bb.add_noise(z, t, noise), t, cond)
>>> bb.blocks()["up_blocks.1.attentions.0"]     # BlockInfo(resolution=(8, 8), channels=64, ...)

This module is the wrapper; :mod:`diffseg_utils.loading` finds and loads the weights
(:func:`~diffseg_utils.loading.load_backbone`, the registry, ADM checkpoints, untrained copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .inputs import ImageLike, prepare_images
from .registry import PAPER_PROMPT_TEMPLATE


@dataclass(frozen=True)
class BlockInfo:
    """A hookable UNet sub-module and the shape of its output at the backbone's native size.

    ``resolution`` is (H, W) of the output feature map, ``channels`` its channel count, both
    read from a dry run; ``kind`` is one of block/resnet/attention/upsampler/downsampler.
    """

    name: str
    kind: str
    resolution: tuple[int, int]
    channels: int
    module: nn.Module = field(repr=False, compare=False)


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a diffusers sub-module's output (tuple, dataclass output or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find a tensor in module output of type {type(out).__name__}")


def default_device() -> torch.device:
    """CUDA if available, then Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Backbone:
    """A diffusion backbone with everything the segmentation methods need.

    Attributes: ``unet``, ``scheduler`` (DDPM, for noising), ``vae`` / ``text_encoder`` /
    ``tokenizer`` (None for pixel models), ``kind`` ("latent" or "pixel"), ``name``,
    ``resolution`` (native image side), ``latent_resolution``, ``latent_channels``,
    ``vae_scale_factor`` (1 for pixel models), ``device``, ``dtype``.
    """

    def __init__(self, *, unet, scheduler, vae=None, text_encoder=None, tokenizer=None, name: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.name = name
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.unet = self._place(unet)
        self.vae = self._place(vae) if vae is not None else None
        self.text_encoder = self._place(text_encoder) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.kind = "latent" if vae is not None else "pixel"
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        cfg_size = unet.config.sample_size
        self.latent_resolution = int(cfg_size if isinstance(cfg_size, int) else cfg_size[0])
        self.resolution = self.latent_resolution * self.vae_scale_factor
        self.latent_channels = int(unet.config.in_channels)
        self._blocks: dict[str, BlockInfo] | None = None
        self._empty: torch.Tensor | None = None
        # conventions that belong to the checkpoint (set from the registry by load_backbone):
        self.prompt_template: str = PAPER_PROMPT_TEMPLATE  # how a class name becomes a prompt
        self.dataset: str | None = None                    # the dataset it was trained for, if any
        self.grounding_defaults: str | None = None         # module with toy-specific grounding settings

    def _place(self, module: nn.Module) -> nn.Module:
        """Move to the backbone's device and dtype (only what differs), frozen, in eval mode."""
        p = next(module.parameters())
        if p.device != self.device:
            module = module.to(self.device)
        if p.dtype != self.dtype:
            module = module.to(dtype=self.dtype)
        return module.eval().requires_grad_(False)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        return (f"Backbone({self.name!r}, kind={self.kind}, resolution={self.resolution}, "
                f"unet={n / 1e6:.1f}M params, device={self.device}, dtype={self.dtype})")

    def with_unet(self, unet: nn.Module, name: str, text_encoder: nn.Module | None = None) -> "Backbone":
        """A backbone sharing everything with this one but the UNet (and optionally the text encoder),
        conventions included (prompt template, dataset, grounding defaults)."""
        bb = Backbone(unet=unet, scheduler=self.scheduler, vae=self.vae, text_encoder=text_encoder or self.text_encoder,
                      tokenizer=self.tokenizer, name=name, device=self.device, dtype=self.dtype)
        bb.prompt_template, bb.dataset, bb.grounding_defaults = self.prompt_template, self.dataset, self.grounding_defaults
        return bb

    # ---------------------------------------------------------------- sizes and inputs
    @property
    def is_conditional(self) -> bool:
        """True when the UNet takes text embeddings (cross-attention)."""
        return self.text_encoder is not None

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def preprocess(self, images: ImageLike | list, size: int | None = None, **kw) -> torch.Tensor:
        """Images -> ``(N, 3, size, size)`` in [-1, 1] on the backbone's device (policy: :mod:`diffseg_utils.inputs`)."""
        return prepare_images(images, size or self.resolution, multiple=self.size_multiple,
                              device=self.device, dtype=self.dtype, **kw)

    # ---------------------------------------------------------------- model calls
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] ``(N, 3, H, W)`` -> UNet input space ``(N, C, h, w)`` (scaled latents, or the images)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects (N, 3, H, W) images in [-1, 1]; got shape {tuple(images.shape)}. "
                             "Use backbone.preprocess(...) to convert PIL/numpy images.")
        images = images.to(self.device, self.dtype)
        if self.vae is None:
            return images
        dist = self.vae.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet-space tensors -> images in [-1, 1] (identity for pixel models)."""
        latents = latents.to(self.device, self.dtype)
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor | None:
        """Text embeddings ``(N, L, D)`` for the prompts ("" = unconditional); None for pixel models."""
        if self.text_encoder is None:
            return None
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    def empty_prompt(self, n: int) -> torch.Tensor | None:
        """The empty-prompt embedding repeated n times (cached), None for pixel models."""
        if self.text_encoder is None:
            return None
        if self._empty is None:
            self._empty = self.encode_prompt([""])
        return self._empty.expand(n, -1, -1)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (scheduler's own schedule).

        The coefficients are computed in float32 whatever ``x0``'s dtype (in bfloat16 ``abar_1 = 0.99915``
        rounds to 1 and the noise would vanish); ``x_t`` comes back in ``x0``'s dtype.
        """
        t = self.check_timesteps(t, x0.shape[0])
        if x0.dtype in (torch.float32,):
            return self.scheduler.add_noise(x0, noise.to(x0), t)
        return self.scheduler.add_noise(x0.float(), noise.float(), t).to(x0.dtype)

    def check_timesteps(self, t: torch.Tensor | int | list[int], n: int) -> torch.Tensor:
        """A (n,) long tensor of timesteps on the backbone's device, checked against the scheduler's range.

        Python ints / lists and CPU tensors are checked on the host (a clear ValueError). A tensor
        already on an accelerator is checked there without waiting for it (``torch._assert_async``):
        no host synchronisation inside per-step loops.
        """
        T = self.scheduler.config.num_train_timesteps
        on_host = not isinstance(t, torch.Tensor) or t.device.type == "cpu"
        if on_host:
            th = torch.as_tensor(t).long()
            if th.numel() and (int(th.min()) < 0 or int(th.max()) >= T):
                raise ValueError(f"timesteps must lie in [0, {T - 1}] (the scheduler's num_train_timesteps={T}); got "
                                 f"{int(th.min())}..{int(th.max())}")
            t = th.to(self.device)
        else:
            t = t.to(self.device).long()
            if t.numel():
                torch._assert_async(((t >= 0) & (t < T)).all())
        if t.ndim == 0:
            t = t.expand(n)
        return t

    def unet_forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
        """The UNet's prediction for ``x_t`` at ``t`` (empty prompt when ``cond`` is None on conditional models)."""
        t = self.check_timesteps(t, x_t.shape[0])
        if self.is_conditional:
            if cond is None:
                cond = self.empty_prompt(x_t.shape[0])
            return self.unet(x_t, t, encoder_hidden_states=cond, **kwargs).sample
        return self.unet(x_t, t, **kwargs).sample

    # ---------------------------------------------------------------- structure
    def blocks(self) -> dict[str, BlockInfo]:
        """Every hookable UNet sub-module, in forward order, with output resolution and channels.

        Found by a dry run at the native size (one zero input), so it holds for any diffusers
        config: down/mid/up blocks, their resnets, attentions, down- and upsamplers.
        """
        if self._blocks is None:
            self._blocks = _dry_run_blocks(self)
        return self._blocks

    def ddim_scheduler(self):
        """A DDIM scheduler sharing this backbone's noise schedule (for sampling / denoising)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config)


def hookable_modules(unet: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """name -> (kind, module) for the UNet's blocks and their direct sub-layers, in definition order."""
    out: dict[str, tuple[str, nn.Module]] = {}
    groups = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        groups.append(("mid_block", unet.mid_block))
    groups += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for gname, block in groups:
        out[gname] = ("block", block)
        for attr, kind in (("resnets", "resnet"), ("attentions", "attention"),
                           ("downsamplers", "downsampler"), ("upsamplers", "upsampler")):
            for j, m in enumerate(getattr(block, attr, None) or []):
                if m is not None:
                    out[f"{gname}.{attr}.{j}"] = (kind, m)
    return out


@torch.no_grad()
def _dry_run_blocks(bb: Backbone) -> dict[str, BlockInfo]:
    mods = hookable_modules(bb.unet)
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    handles = []
    for name, (_, m) in mods.items():
        def hook(_m, _inp, out, name=name):
            if name not in shapes:
                shapes[name] = tuple(first_tensor(out).shape)
                order.append(name)
        handles.append(m.register_forward_hook(hook))
    try:
        r = bb.latent_resolution
        x = torch.zeros(1, bb.latent_channels, r, r, device=bb.device, dtype=bb.dtype)
        bb.unet_forward(x, 0, bb.empty_prompt(1))
    finally:
        for h in handles:
            h.remove()
    # blocks first in forward order; sub-layers listed right after their block
    names = sorted(order, key=lambda n: (order.index(n.split(".resnets")[0].split(".attentions")[0]
                                                     .split(".upsamplers")[0].split(".downsamplers")[0]),
                                         list(mods).index(n)))
    return {n: BlockInfo(n, mods[n][0], (shapes[n][-2], shapes[n][-1]), shapes[n][1], mods[n][1]) for n in names}


def adm_output_block(unet: nn.Module, index: int) -> str:
    """The diffusers module path whose output equals ADM's ``output_blocks[index]`` output.

    ADM (guided-diffusion) numbers decoder layers ``output_blocks[3i + j]`` with 3 = layers per
    block + 1; in diffusers that is ``up_blocks[i]``'s sub-layer j: its attention j if the block
    has attentions (the attention follows resnet j), else resnet j, and for the last sub-layer
    the upsampler if there is one (ADM puts the upsample inside that output block).
    """
    per = len(unet.up_blocks[0].resnets)
    total = per * len(unet.up_blocks)
    if not 0 <= index < total:
        raise ValueError(f"ADM output_blocks index {index} out of range: this UNet has {total} "
                         f"({len(unet.up_blocks)} up blocks x {per} layers), valid 0..{total - 1}")
    i, j = divmod(index, per)
    block = unet.up_blocks[i]
    if j == per - 1 and getattr(block, "upsamplers", None):
        return f"up_blocks.{i}.upsamplers.0"
    if getattr(block, "attentions", None):
        return f"up_blocks.{i}.attentions.{j}"
    return f"up_blocks.{i}.resnets.{j}"


def adm_blocks(unet: nn.Module, indices: list[int]) -> list[str]:
    """Map a list of ADM ``output_blocks`` indices (DDPM-Seg's configs, e.g. [5, 6, 7, 8, 12])."""
    return [adm_output_block(unet, i) for i in indices]


def __getattr__(name: str):  # the loaders moved to loading.py; old imports keep working
    if name in ("load_backbone", "untrained_like", "WeightsNotAvailableError"):
        from . import loading
        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
