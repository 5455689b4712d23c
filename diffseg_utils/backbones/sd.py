"""Stable Diffusion 1.x / 2.x (and the toy SD): VAE + ``UNet2DConditionModel`` + one CLIP text encoder."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning
from .unet import UNetMixin


class SDBackbone(UNetMixin, Backbone):
    """SD 1.x/2.x: the UNet cross-attends to the CLIP text encoder's last hidden states."""

    family = "sd"

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, **kw):
        super().__init__(denoiser=unet, scheduler=scheduler, vae=vae, text_encoders=(text_encoder,),
                         tokenizers=(tokenizer,), **kw)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return Conditioning(self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype))

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        return self.denoiser(x_t, t, encoder_hidden_states=cond.embeds, **kw).sample

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder=None, **bkw):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return cls(unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **mkw),
                   vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **mkw),
                   text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **mkw),
                   tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw), **bkw)
