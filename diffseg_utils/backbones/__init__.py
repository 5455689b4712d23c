"""Backbones: one interface (:class:`Backbone`) and one module per family behind it.

| family | class | denoiser | noise |
|---|---|---|---|
| SD 1.x / 2.x, the toy SD | :class:`SDBackbone` | ``UNet2DConditionModel`` | DDPM |
| SDXL, SSD-1B | :class:`SDXLBackbone` | ``UNet2DConditionModel`` + added conditioning | DDPM |
| pixel DDPM / ADM, toy-faces-ddpm | :class:`PixelBackbone` | ``UNet2DModel`` | DDPM |
| SD3 / SD3.5, the toy MM-DiT | :class:`SD3Backbone` | ``SD3Transformer2DModel`` | flow |
| Flux | :class:`FluxBackbone` | ``FluxTransformer2DModel`` | flow |
| PixArt-Σ / -α | :class:`PixArtBackbone` | ``PixArtTransformer2DModel`` | DDPM |

Adding a family is adding one module with a :class:`Backbone` subclass and one line in
:data:`FAMILIES` (the pipeline class names it loads).
"""
from .base import Backbone, BlockInfo, Conditioning, default_device, first_tensor, tokens_to_map
from .flux import FluxBackbone
from .noise import DDPMNoise, FlowNoise
from .pixart import PixArtBackbone
from .pixel import PixelBackbone
from .sd import SDBackbone
from .sd3 import SD3Backbone
from .sdxl import SDXLBackbone
from .unet import adm_blocks, adm_output_block

FAMILIES: dict[str, type[Backbone]] = {
    "StableDiffusionPipeline": SDBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "FluxPipeline": FluxBackbone,
    "PixArtSigmaPipeline": PixArtBackbone,
    "PixArtAlphaPipeline": PixArtBackbone,
    "DDPMPipeline": PixelBackbone,
    "DDIMPipeline": PixelBackbone,
}
"""Which family loads a diffusers pipeline directory, by its ``model_index.json`` ``_class_name``."""

__all__ = ["Backbone", "BlockInfo", "Conditioning", "DDPMNoise", "FAMILIES", "FlowNoise", "FluxBackbone",
           "PixArtBackbone", "PixelBackbone", "SD3Backbone", "SDBackbone", "SDXLBackbone", "adm_blocks",
           "adm_output_block", "default_device", "first_tensor", "tokens_to_map"]
