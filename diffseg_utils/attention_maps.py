"""DAAM cross-attention heat maps (Tang et al., ACL 2023): the training-free baseline of Grounded Diffusion.

While images are generated, every cross-attention layer's probabilities (conditional half of the
batch only) are averaged over heads, upsampled to a common grid (bicubic) and added into one
running sum, so memory stays ``O(N * K * R^2)`` (N images, K text tokens, R the grid side)
whatever the number of steps and layers. A word's heat map is the mean over its tokens of that
sum (over steps) averaged over layers, resized to the image, min-max normalised to [0, 1] and
thresholded (0.4) for a mask.

>>> with CrossAttentionMaps(bb) as cam:                      # doctest: +SKIP
...     images = generate(bb, prompts, num_steps=50, guidance_scale=7.5)
>>> cam.heatmaps(prompts, [["dog"], ["cat"]])                # (N, 1, R, R) in [0, 1]
>>> daam_segment(bb, prompts, ["dog", "cat"]).masks          # generate + maps in one call

The context manager only installs processors and a UNet pre-hook; it never calls the UNet
itself, so it wraps :func:`~diffseg_utils.sampling.generate`, ``generate_with_features`` or any
loop that calls ``backbone.denoiser`` (one UNet call = one step).

Differences from castorini/daam, on purpose: DAAM keeps one time-summed map per (layer, head)
at the layer's own resolution and clamps each after upsampling; we average heads and upsample
at every call and clamp each upsampled map at 0 before adding (bicubic undershoots), which is
what makes the memory independent of layers and heads. Both are linear up to that clamp. DAAM
hard-codes a 64x64 grid and "skip factor 8"; we derive both from the backbone (see
:class:`CrossAttentionMaps`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionLayer, ControlledAttnProcessor, attention_layers
from .backbones import Backbone
from .hooks import AttentionProcessors
from .sampling import generate
from .text import token_span

__all__ = ["CrossAttentionMaps", "DAAMResult", "MapAccumulator", "daam_segment", "word_heatmaps"]


def word_heatmaps(maps: torch.Tensor, tokenizer, prompts: Sequence[str] | str,
                  words_per_prompt: Sequence[Sequence[str]] | Sequence[str] | str,
                  image_size: int | tuple[int, int]) -> torch.Tensor:
    """Word heat maps ``(N, W, H, W_img)`` in [0, 1] from per-token maps ``(N, K, r, r)``.

    A word's map is the mean of its tokens' maps (positions from ``tokenizer``, the one whose tokens
    index the text condition), bicubic to ``image_size``, min-max normalised per map (DAAM's rule).
    ``words_per_prompt``: one list of words per prompt, each occurring in its prompt (``ValueError``
    from :func:`token_span` otherwise); W is the longest list, missing words' maps are zero.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(words_per_prompt, str):
        words_per_prompt = [words_per_prompt]
    words = [[w] if isinstance(w, str) else list(w) for w in words_per_prompt]
    if len(prompts) != maps.shape[0] or len(words) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts and {len(words)} word lists for {maps.shape[0]} "
                         "generated images; pass one prompt and one word list per image, in batch order")
    if any(len(w) == 0 for w in words):
        raise ValueError(f"every prompt needs at least one word; got counts {[len(w) for w in words]}")
    return token_heatmaps(maps, [[token_span(tokenizer, p, w) for w in ws] for p, ws in zip(prompts, words)],
                          image_size)


def token_heatmaps(maps: torch.Tensor, positions: Sequence[Sequence[Sequence[int]]],
                   image_size: int | tuple[int, int]) -> torch.Tensor:
    """Heat maps ``(N, W, H, W_img)`` in [0, 1] of token groups: ``positions[i][j]`` lists the token
    indices of group ``j`` of image ``i`` in the per-token maps ``(N, K, r, r)``; a group's map is the
    mean of its tokens' maps, bicubic to ``image_size``, min-max normalised per map (DAAM's rule). W is
    the most groups of any image; missing groups' maps are zero."""
    width = max(len(g) for g in positions)
    per_word = maps.new_zeros(len(positions), width, *maps.shape[-2:])      # (N, W, r, r)
    for i, groups in enumerate(positions):
        for j, idx in enumerate(groups):
            per_word[i, j] = maps[i, list(idx)].mean(0)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(per_word.shape[-2:]) != size:
        per_word = F.interpolate(per_word.float(), size=size, mode="bicubic", align_corners=False)
    lo = per_word.amin((-2, -1), keepdim=True)
    hi = per_word.amax((-2, -1), keepdim=True)
    return ((per_word - lo) / (hi - lo).clamp_min(1e-12)).clamp_(0, 1)


class MapAccumulator:
    """The running sum shared by all capturing processors: ``(N, K, R, R)`` float32.

    ``cond_rows`` says which rows of a UNet batch are conditional: ``"second_half"`` (classifier-free
    guidance batches ``[uncond; cond]``, as :func:`generate` does) or ``"all"``.
    """

    def __init__(self, resolution: tuple[int, int], cond_rows: str = "second_half",
                 steps: Iterable[int] | None = None):
        if cond_rows not in ("second_half", "all"):
            raise ValueError(f"cond_rows must be 'second_half' or 'all', got {cond_rows!r}")
        self.resolution = resolution
        self.cond_rows = cond_rows
        self.steps = None if steps is None else {int(s) for s in steps}
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | None = None   # (N, K, R, R)
        self.unet_calls = 0                    # UNet forward passes seen (= denoising steps)
        self.accumulated_steps: list[int] = []  # the calls whose maps are in the sum

    @property
    def step(self) -> int:
        """Index of the UNet call in progress (0-based, since entering or the last reset)."""
        return self.unet_calls - 1

    @property
    def active(self) -> bool:
        return self.unet_calls > 0 and (self.steps is None or self.step in self.steps)

    def start_call(self) -> None:
        self.unet_calls += 1
        if self.active:
            self.accumulated_steps.append(self.step)

    @torch.no_grad()
    def add(self, probs: torch.Tensor, heads: int, grid: tuple[int, int]) -> None:
        """Add one layer's probabilities ``(B * heads, h * w, K)`` (diffusers' batch-major head layout)."""
        bh, q, k = probs.shape
        b = bh // heads
        p = probs.reshape(b, heads, q, k)
        if self.cond_rows == "second_half":
            if b % 2:
                raise RuntimeError(f"cfg_batch=True expects a [uncond; cond] UNet batch of even size, got {b}; "
                                   "use cfg_batch=False when the UNet batch holds only conditional rows")
            p = p[b // 2:]
        m = p.float().mean(1)                                            # (n, h*w, K): mean over heads
        m = m.transpose(1, 2).reshape(m.shape[0], k, *grid)              # (n, K, h, w)
        if tuple(grid) != tuple(self.resolution):
            m = F.interpolate(m, size=self.resolution, mode="bicubic", align_corners=False).clamp_(min=0)
        if self.sum is None:
            self.sum = torch.zeros_like(m)
        elif self.sum.shape != m.shape:
            raise RuntimeError(f"cross-attention maps of shape {tuple(m.shape)} cannot be added to the running sum "
                               f"{tuple(self.sum.shape)}: the batch size or prompt length changed between UNet calls. "
                               "Call .reset() (or use a new CrossAttentionMaps) before each generation.")
        self.sum += m


class _CapturingProcessor(ControlledAttnProcessor):
    """ControlledAttnProcessor's math (output unchanged); each call's probabilities go to a MapAccumulator."""

    def __init__(self, acc: MapAccumulator, layer: AttentionLayer):
        super().__init__(capture_probs=True)
        self.acc = acc
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.enabled = self.acc.active and encoder_hidden_states is not None
        out = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.probs:
            probs = self.probs.pop()
            self.probs.clear()
            self.acc.add(probs, attn.heads, self._grid(probs.shape[1]))
        return out

    def _grid(self, q: int) -> tuple[int, int]:
        h, w = self.layer.resolution
        if q == h * w:
            return h, w
        side = round(q ** 0.5)
        if side * side == q:
            return side, side
        raise RuntimeError(f"cannot tell the token grid of {self.layer.path} from {q} queries (native {h}x{w}); "
                           "cross-attention maps support the native size or square latents")


class CrossAttentionMaps:
    """Accumulate DAAM heat maps over every UNet call made inside the ``with`` block.

    cfg_batch:      True when the UNet batch is ``[uncond; cond]``, as :func:`generate` makes it
                    with classifier-free guidance (``guidance_scale != 1``): only the second half is
                    used. False when every row is conditional (``guidance_scale == 1``).
    min_resolution: cross-attention layers whose token grid side is below this are skipped.
                    Default ``latent_resolution // 4``: SD 1.x at 512² keeps 64/32/16 and skips the
                    8x8 mid block (DAAM's rule); the toy model (16² latents) keeps 16/8/4.
    resolution:     side of the common grid the maps are upsampled to (default: the latent
                    resolution, 64 for SD at 512², as DAAM).
    steps:          UNet-call indices (0-based from entering or :meth:`reset`) to accumulate;
                    None = all. With :func:`generate` one call is one denoising step.

    After the block: :meth:`heatmaps`, :meth:`masks`, :attr:`maps`. Entering again keeps adding to
    the same sum; :meth:`reset` clears it.
    """

    def __init__(self, backbone: Backbone, cfg_batch: bool = True, min_resolution: int | None = None,
                 *, resolution: int | None = None, steps: Iterable[int] | None = None):
        if not backbone.is_conditional:
            raise ValueError(f"{backbone.name or 'this backbone'} is unconditional (no text encoder, no "
                             "cross-attention): DAAM heat maps need a text-conditioned UNet such as Stable Diffusion")
        self.backbone = backbone
        if not isinstance(cfg_batch, bool):
            raise TypeError(f"cfg_batch must be True or False (whether the UNet batch is [uncond; cond]), got "
                            f"{cfg_batch!r}; for a guidance scale g pass cfg_batch=(g != 1)")
        use_cfg = cfg_batch
        self.min_resolution = max(1, backbone.latent_resolution // 4) if min_resolution is None else int(min_resolution)
        cross = [a for a in attention_layers(backbone) if a.cross]
        if not cross:
            raise ValueError("this UNet has no cross-attention layer; DAAM heat maps need one")
        self.layers = [a for a in cross if min(a.resolution) >= self.min_resolution]
        if not self.layers:
            raise ValueError(f"no cross-attention layer has a token grid of at least {self.min_resolution} "
                             f"(they have {sorted({min(a.resolution) for a in cross})}); lower min_resolution")
        r = int(resolution or backbone.latent_resolution)
        self._acc = MapAccumulator((r, r), "second_half" if use_cfg else "all", steps)
        self._procs: AttentionProcessors | None = None
        self._hook = None

    # ---------------------------------------------------------------- installation
    def __enter__(self) -> "CrossAttentionMaps":
        if self._procs is not None:
            raise RuntimeError("CrossAttentionMaps is already installed; exit it first or use a new one")
        procs = AttentionProcessors(self.backbone.denoiser,
                                    {a.path: _CapturingProcessor(self._acc, a) for a in self.layers})
        procs.__enter__()
        self._procs = procs
        self._hook = self.backbone.denoiser.register_forward_pre_hook(lambda *_: self._acc.start_call())
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._procs is not None:
            self._procs.__exit__(*exc)
            self._procs = None

    def reset(self) -> None:
        """Forget everything accumulated (and restart step counting at 0)."""
        self._acc.reset()

    # ---------------------------------------------------------------- results
    @property
    def num_calls(self) -> int:
        """UNet calls seen so far."""
        return self._acc.unet_calls

    @property
    def steps_used(self) -> list[int]:
        """The UNet-call indices whose maps are in the sum."""
        return list(self._acc.accumulated_steps)

    @property
    def maps(self) -> torch.Tensor:
        """Per-token maps ``(N, K, R, R)``: summed over accumulated steps, averaged over layers and heads."""
        if self._acc.sum is None:
            raise RuntimeError("no cross-attention maps were recorded: run the UNet (e.g. generate(...)) inside "
                               "`with CrossAttentionMaps(backbone) as cam:` before asking for heat maps"
                               + (f" (steps={sorted(self._acc.steps)} selected none of the "
                                  f"{self._acc.unet_calls} UNet calls)" if self._acc.unet_calls else ""))
        return self._acc.sum / len(self.layers)

    def heatmaps(self, prompts: Sequence[str], words_per_prompt: Sequence[Sequence[str]],
                 image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Word heat maps ``(N, W, H, W_img)`` in [0, 1] (min-max per map); W words per prompt.

        prompts:          the prompts the maps were generated with, in batch order.
        words_per_prompt: for each prompt its words; each must occur in its prompt (``ValueError``
                          from :func:`token_span` otherwise). W is the longest list; maps of the
                          missing words of shorter lists are all zero.
        image_size:       output side or (H, W); default the backbone's image resolution.
        """
        return word_heatmaps(self.maps, self.backbone.prompt_tokenizer, prompts, words_per_prompt,
                             image_size or self.backbone.resolution)

    def masks(self, prompts: Sequence[str], words_per_prompt: Sequence[Sequence[str]],
              image_size: int | tuple[int, int] | None = None, threshold: float = 0.4) -> torch.Tensor:
        """Boolean masks ``heatmaps(...) > threshold`` (DAAM's 0.4), shape ``(N, W, H, W_img)``."""
        return self.heatmaps(prompts, words_per_prompt, image_size) > threshold


@dataclass
class DAAMResult:
    """Generated images and the DAAM heat maps and masks of the requested words."""

    images: torch.Tensor    # (N, 3, R, R) in [-1, 1]
    heatmaps: torch.Tensor  # (N, W, R, R) float in [0, 1]
    masks: torch.Tensor     # (N, W, R, R) bool


def daam_segment(backbone: Backbone, prompts: Sequence[str], words: Sequence[str] | Sequence[Sequence[str]], *,
                 num_steps: int = 50, guidance_scale: float = 7.5, seed: int | Sequence[int] = 0,
                 threshold: float = 0.4, min_resolution: int | None = None) -> DAAMResult:
    """Generate one image per prompt (DDIM) and segment ``words`` in it with DAAM.

    words: one word per prompt (``["dog", "cat"]``) or a list of words per prompt
           (``[["dog", "ball"], ["cat", "sofa"]]``, the same count for each).
    """
    prompts = list(prompts)
    with CrossAttentionMaps(backbone, cfg_batch=guidance_scale != 1.0, min_resolution=min_resolution) as cam:
        images = generate(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
    heat = cam.heatmaps(prompts, words, image_size=tuple(images.shape[-2:]))
    return DAAMResult(images=images, heatmaps=heat, masks=heat > threshold)
