"""Unconditional pixel UNets: google/ddpm-* (``UNet2DModel``), DDPM-Seg's converted ADM checkpoints, toy-faces-ddpm."""
from __future__ import annotations

import torch

from .base import Backbone
from .unet import UNetMixin


class PixelBackbone(UNetMixin, Backbone):
    """A ``UNet2DModel`` on images, with its DDPM scheduler; no VAE, no text."""

    family = "pixel"

    def __init__(self, *, unet, scheduler, **kw):
        super().__init__(denoiser=unet, scheduler=scheduler, **kw)

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        return self.denoiser(x_t, t, **kw).sample

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder, **bkw):
        from diffusers import DDPMScheduler, UNet2DModel

        sub = "unet" if index is not None and "unet" in index and has_subfolder("unet") else None
        unet = UNet2DModel.from_pretrained(root, subfolder=sub, **mkw)
        sched_sub = "scheduler" if index is not None and "scheduler" in index and has_subfolder("scheduler") else None
        return cls(unet=unet, scheduler=DDPMScheduler.from_pretrained(root, subfolder=sched_sub, **kw), **bkw)
