"""What every diffusion-transformer family shares: blocks as token grids, read back as feature maps."""
from __future__ import annotations

from typing import Any

import torch

from .base import tokens_to_map


class TransformerMixin:
    """Blocks of a diffusers DiT: ``transformer_blocks.{i}`` (and Flux's ``single_transformer_blocks.{i}``).

    A block's feature map is its image-token output on the token grid, ``(N, width, h / p, w / p)``
    for latents ``(N, C, h, w)`` and patch (or packing) size ``p``. Joint blocks (SD3, Flux) return
    ``(text, image)``; the image half is read. The grid of the current forward is set by
    :meth:`_set_grid` (the family's ``_forward``), so any input size reads right.
    """

    block_lists: tuple[tuple[str, str], ...] = (("transformer_blocks", "block"),)
    _grid: tuple[int, int] | None = None

    def hookable_modules(self):
        out = {}
        for attr, kind in self.block_lists:
            for i, m in enumerate(getattr(self.denoiser, attr, None) or []):
                out[f"{attr}.{i}"] = (kind, m)
        return out

    def _denoiser_stride(self) -> int:
        return int(self.denoiser.config.patch_size)

    def _set_grid(self, x_t: torch.Tensor) -> None:
        p = self._denoiser_stride()
        self._grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)

    def read_block(self, output: Any) -> torch.Tensor:
        tokens = output[1] if isinstance(output, tuple) else output
        return tokens_to_map(tokens, self._grid)
