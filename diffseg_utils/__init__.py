"""diffseg_utils: the compute kernels behind the diffseg notebooks.

Public surface (see each module for details):

* :func:`load_backbone` / :class:`Backbone` / :func:`list_backbones` — one interface over
  Stable Diffusion (latent) and DDPM/ADM (pixel) diffusers checkpoints, plus the shipped toy model.
* :func:`prepare_images` — PIL / numpy / torch images to a backbone's input tensor.
* :func:`adm_blocks` — DDPM-Seg's ADM ``output_blocks`` indices as diffusers module paths.
"""
from .backbones import (Backbone, BlockInfo, WeightsNotAvailableError, adm_blocks, adm_output_block,
                        load_backbone, untrained_like)
from .inputs import prepare_images
from .registry import list_backbones

__all__ = ["Backbone", "BlockInfo", "WeightsNotAvailableError", "adm_blocks", "adm_output_block",
           "load_backbone", "list_backbones", "prepare_images", "untrained_like"]
__version__ = "0.1.0"
