"""What every UNet family shares: its hookable blocks, its stride, and ADM's block numbering."""
from __future__ import annotations

from torch import nn


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


class UNetMixin:
    """Blocks and stride of a diffusers UNet denoiser (``UNet2DModel`` / ``UNet2DConditionModel``)."""

    def hookable_modules(self):
        return hookable_modules(self.denoiser)

    def _denoiser_stride(self) -> int:
        return 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def feature_blocks(self) -> list[str]:
        return [n for n in self.blocks() if n.startswith("up_blocks") and ".upsamplers" not in n]


def adm_output_block(unet: nn.Module, index: int) -> str:
    """The diffusers module path whose output equals ADM's ``output_blocks[index]`` output.

    ADM (guided-diffusion) numbers decoder layers ``output_blocks[3i + j]`` with 3 = layers per
    block + 1; in diffusers that is ``up_blocks[i]``'s sub-layer j: its attention j if the block
    has attentions (the attention follows resnet j), else resnet j, and for the last sub-layer
    the upsampler if there is one (ADM puts the upsample inside that output block).
    """
    if not hasattr(unet, "up_blocks"):
        raise ValueError(f"ADM output_blocks indices name UNet decoder layers; this denoiser is a "
                         f"{type(unet).__name__}: pass block names from backbone.blocks() instead")
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
