"""UNet features for grounding: every down, mid and up block output, grouped by resolution.

Grounded Diffusion feeds its visual encoder with the outputs of all down, mid and up blocks,
grouped by spatial resolution (SD 1.x at 512²: 64, 32, 16, 8). With classifier-free guidance
the unconditional and conditional halves of the batch are concatenated on channels. The
groups come from ``backbone.blocks()`` (a dry run), so they hold for any diffusers UNet.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..backbones import Backbone
from ..sampling import generate


def feature_groups(backbone: Backbone) -> dict[int, list[str]]:
    """Top-level block names per output resolution (height), lowest resolution first (a DiT: one group).

    >>> feature_groups(sd15)   # doctest: +SKIP
    {8: ['down_blocks.3', 'mid_block', 'up_blocks.0'], 16: [...], 32: [...], 64: [...]}
    """
    groups: dict[int, list[str]] = {}
    for name, info in backbone.blocks().items():
        if info.kind in ("block", "joint", "single"):  # top-level blocks, UNet or transformer
            groups.setdefault(info.resolution[0], []).append(name)
    return dict(sorted(groups.items()))


def feature_channels(backbone: Backbone, cfg_batch: bool = True) -> dict[int, int]:
    """Input channels per resolution group (doubled when uncond and cond halves are concatenated)."""
    blocks = backbone.blocks()
    mult = 2 if cfg_batch and backbone.is_conditional else 1
    return {r: mult * sum(blocks[n].channels for n in names) for r, names in feature_groups(backbone).items()}


@dataclass
class GeneratedBatch:
    """Images generated from prompts and the grounding features captured while generating them."""

    images: torch.Tensor              # (N, 3, R, R) in [-1, 1]
    features: dict[int, torch.Tensor]  # resolution -> (N, C_r, r, r), C_r = feature_channels(...)[r]
    prompts: list[str]
    timestep: int                     # the UNet timestep the features were taken at


@torch.no_grad()
def generate_with_features(
    backbone: Backbone,
    prompts: Sequence[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int | Sequence[int] = 0,
    feature_step: int = -1,
    dtype: torch.dtype = torch.float16,
) -> GeneratedBatch:
    """Generate images (DDIM + classifier-free guidance) and capture grounding features in the same pass.

    feature_step: index into the DDIM steps whose UNet call is captured (-1 = the last step, the
                  paper's default; its ablation prefers t = 5, i.e. a late step).
    With guidance_scale != 1 the unconditional and conditional block outputs are concatenated on
    channels ([uncond, cond]), as in the paper; no extra UNet call is made.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    step = feature_step % num_steps if -num_steps <= feature_step < num_steps else None
    if step is None:
        raise ValueError(f"feature_step must be in [-{num_steps}, {num_steps - 1}], got {feature_step}")
    groups = feature_groups(backbone)
    names = [n for ns in groups.values() for n in ns]
    use_cfg = backbone.is_conditional and guidance_scale != 1.0
    n = len(prompts)
    snap: dict[str, torch.Tensor] = {}
    taken: list[int] = []

    def take(i: int, t: int, _x, _eps) -> None:
        if i == step:
            for name in names:
                o = cap.outputs[name]
                snap[name] = torch.cat(o.chunk(2), dim=1) if use_cfg else o
            taken.append(t)

    with backbone.capture(names, transform=lambda o: o.detach().to(dtype)) as cap:
        images = generate(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, callback=take)
    feats = {r: torch.cat([snap[b] for b in ns], dim=1) for r, ns in groups.items()}
    assert all(f.shape[0] == n for f in feats.values())
    # the callback sees the timestep the step started from
    return GeneratedBatch(images, feats, prompts, taken[0])
