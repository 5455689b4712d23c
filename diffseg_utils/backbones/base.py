"""One interface over diffusers backbones, UNets and transformers alike.

>>> bb = load_backbone("toy")                  # or "sdxl", "sd3-medium", "flux-dev", "pixart-sigma", a directory
>>> x = bb.preprocess(pil_images)             # (N, 3, R, R) in [-1, 1]
>>> z = bb.encode(x)                          # the denoiser's input space (scaled latents, or x itself)
>>> cond = bb.encode_prompt(["a photo of a cat"])   # Conditioning, or None (unconditional models)
>>> out = bb.predict(bb.add_noise(z, t, noise), t, cond)   # epsilon / v / flow velocity
>>> bb.blocks()["up_blocks.1.attentions.0"]  # BlockInfo(resolution=(8, 8), channels=64, ...)

A family (``sd.py``, ``sdxl.py``, ``pixel.py``, ``sd3.py``, ``flux.py``, ``pixart.py``) is a
subclass that says how to call its denoiser, how to encode text and which sub-modules are its
blocks; everything the methods use is here. Loading weights lives in :mod:`diffseg_utils.loading`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from ..inputs import ImageLike, prepare_images
from ..registry import PAPER_PROMPT_TEMPLATE
from .noise import DDPMNoise, FlowNoise


@dataclass(frozen=True)
class BlockInfo:
    """A hookable denoiser sub-module and the shape of its output as a feature map at the native size.

    ``resolution`` is (h, w) of the map (a transformer block's token grid), ``channels`` its
    width, both read from a dry run; ``kind`` is block/resnet/attention/upsampler/downsampler for
    UNets, joint/single/block for transformer blocks.
    """

    name: str
    kind: str
    resolution: tuple[int, int]
    channels: int
    module: nn.Module = field(repr=False, compare=False)


@dataclass
class Conditioning:
    """A batch's text conditioning, whatever the family; every tensor is batch-first.

    embeds: (N, L, D) token embeddings the denoiser attends to.
    pooled: (N, P) pooled text vector (SDXL, SD3, Flux), else None.
    mask:   (N, L) attention mask over tokens (PixArt's T5), else None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def repeat(self, k: int) -> "Conditioning":
        """The batch repeated ``k`` times, whole (``[c; c; ...]``, as ``Tensor.repeat``)."""
        return self._map(lambda v: v.repeat(k, *([1] * (v.ndim - 1))))

    def expand(self, n: int) -> "Conditioning":
        """A batch-1 conditioning broadcast to ``n`` (no copy)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (e.g. ``[uncond; cond]`` for classifier-free guidance)."""
        first = parts[0]
        return replace(first, **{f.name: torch.cat([getattr(p, f.name) for p in parts])
                                 for f in fields(first) if getattr(first, f.name) is not None})


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

    Attributes: ``denoiser`` (the UNet or transformer), ``scheduler`` (its training schedule),
    ``noise`` (:class:`DDPMNoise` or :class:`FlowNoise`), ``vae`` (None for pixel models),
    ``text_encoders`` / ``tokenizers`` (tuples, empty for unconditional models), ``kind``
    ("latent" or "pixel"), ``family``, ``name``, ``resolution`` (native image side),
    ``latent_resolution``, ``latent_channels``, ``vae_scale_factor`` (1 for pixel models),
    ``device``, ``dtype``. ``sample_size`` overrides the native latent side the config gives.

    A family subclass implements :meth:`encode_prompt` (conditional models), :meth:`_forward`
    and :meth:`hookable_modules`, and overrides :meth:`read_block` when its block outputs are
    not ``(N, C, h, w)`` maps.
    """

    family = "base"
    default_sample_size = 64  # latent side when the denoiser's config names none (Flux's does not)

    def __init__(self, *, denoiser: nn.Module, scheduler, vae: nn.Module | None = None,
                 text_encoders: tuple = (), tokenizers: tuple = (), name: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 sample_size: int | None = None):
        self.name = name
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.denoiser = self._place(denoiser)
        self.vae = self._place(vae) if vae is not None else None
        self.text_encoders = tuple(self._place(t) for t in text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.scheduler = scheduler
        self.noise = FlowNoise(scheduler) if "FlowMatch" in type(scheduler).__name__ else DDPMNoise(scheduler)
        self.kind = "latent" if vae is not None else "pixel"
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        cfg_size = sample_size or getattr(denoiser.config, "sample_size", None) or self.default_sample_size
        self.latent_resolution = int(cfg_size if isinstance(cfg_size, int) else cfg_size[0])
        self.resolution = self.latent_resolution * self.vae_scale_factor
        self.latent_channels = int(denoiser.config.in_channels)
        self._blocks: dict[str, BlockInfo] | None = None
        self._empty: Conditioning | None = None
        # conventions that belong to the checkpoint (set from the registry by load_backbone):
        self.prompt_template: str = PAPER_PROMPT_TEMPLATE  # how a class name becomes a prompt
        self.dataset: str | None = None                    # the dataset it was trained for, if any
        self.grounding_defaults: str | None = None         # "package.module:NAME" of its GroundingDefaults

    def _place(self, module: nn.Module) -> nn.Module:
        """Move to the backbone's device and dtype (only what differs), frozen, in eval mode."""
        p = next(module.parameters())
        if p.device != self.device:
            module = module.to(self.device)
        if p.dtype != self.dtype:
            module = module.to(dtype=self.dtype)
        return module.eval().requires_grad_(False)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.denoiser.parameters())
        return (f"{type(self).__name__}({self.name!r}, kind={self.kind}, resolution={self.resolution}, "
                f"{type(self.denoiser).__name__}={n / 1e6:.1f}M params, device={self.device}, dtype={self.dtype})")

    def with_denoiser(self, denoiser: nn.Module, name: str, text_encoder: nn.Module | None = None) -> "Backbone":
        """A backbone sharing everything with this one but the denoiser (and optionally the first text
        encoder), conventions included (prompt template, dataset, grounding defaults)."""
        bb = copy.copy(self)
        bb.name, bb.denoiser, bb._blocks, bb._empty = name, self._place(denoiser), None, None
        if text_encoder is not None:
            bb.text_encoders = (self._place(text_encoder), *self.text_encoders[1:])
        return bb

    # ---------------------------------------------------------------- sizes and inputs
    @property
    def text_encoder(self) -> nn.Module | None:
        """The first (or only) text encoder, None for unconditional models."""
        return self.text_encoders[0] if self.text_encoders else None

    @property
    def tokenizer(self):
        """The tokenizer of the first text encoder (word spans for attention maps), None when unconditional."""
        return self.tokenizers[0] if self.tokenizers else None

    @property
    def prompt_tokenizer(self):
        """The tokenizer whose token positions index ``encode_prompt(...).embeds`` (from position 0)."""
        return self.tokenizer

    @property
    def is_conditional(self) -> bool:
        """True when the denoiser takes text conditioning."""
        return bool(self.text_encoders)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the denoiser's own downsampling)."""
        return self.vae_scale_factor * self._denoiser_stride()

    def _denoiser_stride(self) -> int:
        raise NotImplementedError

    def preprocess(self, images: ImageLike | list, size: int | None = None, **kw) -> torch.Tensor:
        """Images -> ``(N, 3, size, size)`` in [-1, 1] on the backbone's device (policy: :mod:`diffseg_utils.inputs`)."""
        return prepare_images(images, size or self.resolution, multiple=self.size_multiple,
                              device=self.device, dtype=self.dtype, **kw)

    # ---------------------------------------------------------------- model calls
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] ``(N, 3, H, W)`` -> denoiser input space ``(N, C, h, w)`` (scaled latents, or the images)."""
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
        """Denoiser-space tensors -> images in [-1, 1] (identity for pixel models)."""
        latents = latents.to(self.device, self.dtype)
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    def encode_prompt(self, prompts: list[str] | str) -> Conditioning | None:
        """Text conditioning for the prompts ("" = unconditional); None for unconditional models."""
        return None

    def empty_prompt(self, n: int) -> Conditioning | None:
        """The empty-prompt conditioning broadcast to n (cached), None for unconditional models."""
        if not self.is_conditional:
            return None
        if self._empty is None:
            self._empty = self.encode_prompt([""])
        return self._empty.expand(n)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """The forward process at ``t`` (see :mod:`diffseg_utils.backbones.noise` for what ``t`` means)."""
        return self.noise.add_noise(x0, self.check_timesteps(t, x0.shape[0]), noise)

    def check_timesteps(self, t: torch.Tensor | float | list, n: int) -> torch.Tensor:
        """A (n,) tensor of timesteps on the backbone's device, checked against ``[0, noise.max_t]``.

        Integer for DDPM-family schedules, float for flow matching. Python numbers / lists and CPU
        tensors are checked on the host (a clear ValueError); a tensor already on an accelerator is
        checked there without waiting for it (``torch._assert_async``): no host synchronisation.
        """
        T, top, dt = self.noise.T, self.noise.max_t, self.noise.timestep_dtype
        if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
            th = torch.as_tensor(t).to(dt)
            if th.numel() and (float(th.min()) < 0 or float(th.max()) > top):
                raise ValueError(f"timesteps must lie in [0, {top}] (the scheduler's num_train_timesteps={T}); got "
                                 f"{float(th.min()):g}..{float(th.max()):g}")
            t = th.to(self.device)
        else:
            t = t.to(self.device, dt)
            if t.numel():
                torch._assert_async(((t >= 0) & (t <= top)).all())
        if t.ndim == 0:
            t = t.expand(n)
        return t

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | float, cond: Conditioning | None = None,
                **kwargs) -> torch.Tensor:
        """The denoiser's output for ``x_t`` ``(N, C, h, w)`` at ``t``: epsilon, v or sample for DDPM-family
        schedules (the scheduler's ``prediction_type``), the velocity ``e - x_0`` for flow matching.
        ``cond`` defaults to the empty prompt on conditional models. Same shape and dtype as ``x_t``."""
        t = self.check_timesteps(t, x_t.shape[0])
        if self.is_conditional and cond is None:
            cond = self.empty_prompt(x_t.shape[0])
        return self._forward(x_t, t, cond, **kwargs)

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def sampler(self, num_steps: int):
        """A scheduler for sampling with ``num_steps`` steps set: DDIM on DDPM schedules, the family's own
        flow scheduler (with its resolution shift) on flow matching."""
        return self.noise.sampler(num_steps, self.device)

    def step(self, model_output: torch.Tensor, t: float, t_prev: float | None, x: torch.Tensor) -> torch.Tensor:
        """One deterministic step of ``x`` from ``t`` to ``t_prev`` (None: to the clean sample)."""
        return self.noise.step(model_output, t, t_prev, x)

    # ---------------------------------------------------------------- structure
    def hookable_modules(self) -> dict[str, tuple[str, nn.Module]]:
        """name -> (kind, module) for every sub-module whose output is a feature map, in definition order."""
        raise NotImplementedError

    def feature_blocks(self) -> list[str]:
        """The blocks a representation analysis sweeps (UNets: the decoder; transformers: every block)."""
        return list(self.blocks())

    def read_block(self, output: Any) -> torch.Tensor:
        """A hooked sub-module's output as a feature map ``(N, C, h, w)``."""
        return first_tensor(output)

    def blocks(self) -> dict[str, BlockInfo]:
        """Every hookable sub-module, in forward order, with its map's resolution and channels (a dry run)."""
        if self._blocks is None:
            self._blocks = self._dry_run_blocks()
        return self._blocks

    def capture(self, names, transform=None):
        """A :class:`~diffseg_utils.hooks.CaptureOutputs` on the denoiser that stores each named block's
        output as an ``(N, C, h, w)`` map (then ``transform``ed)."""
        from ..hooks import CaptureOutputs

        return CaptureOutputs(self.denoiser, names, transform=transform, read=self.read_block)

    @torch.no_grad()
    def _dry_run_blocks(self) -> dict[str, BlockInfo]:
        mods = self.hookable_modules()
        shapes: dict[str, tuple[int, ...]] = {}
        order: list[str] = []
        handles = []
        for name, (_, m) in mods.items():
            def hook(_m, _inp, out, name=name):
                if name not in shapes:
                    shapes[name] = tuple(self.read_block(out).shape)
                    order.append(name)
            handles.append(m.register_forward_hook(hook))
        try:
            r = self.latent_resolution
            x = torch.zeros(1, self.latent_channels, r, r, device=self.device, dtype=self.dtype)
            self.predict(x, 0, self.empty_prompt(1))
        finally:
            for h in handles:
                h.remove()
        # blocks first in forward order; sub-layers listed right after their block
        def parent(n: str) -> str:
            for part in (".resnets", ".attentions", ".upsamplers", ".downsamplers"):
                n = n.split(part)[0]
            return n
        names = sorted(order, key=lambda n: (order.index(parent(n)) if parent(n) in order else order.index(n),
                                             list(mods).index(n)))
        return {n: BlockInfo(n, mods[n][0], (shapes[n][-2], shapes[n][-1]), shapes[n][1], mods[n][1]) for n in names}


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens ``(N, h*w, C)`` in raster order -> a map ``(N, C, h, w)``."""
    n, hw, c = tokens.shape
    h, w = grid
    if hw != h * w:
        raise ValueError(f"{hw} image tokens do not fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(n, c, h, w)
