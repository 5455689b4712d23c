"""SDXL and SSD-1B: ``UNet2DConditionModel`` with SDXL's added conditioning and two CLIP text encoders."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning
from .unet import UNetMixin


class SDXLBackbone(UNetMixin, Backbone):
    """SDXL: token embeddings are the two encoders' penultimate hidden states side by side (768 + 1280
    = 2048 per token); the pooled vector is the second encoder's projected end-of-text state; the
    micro-conditioning ``time_ids`` say the image was neither resized nor cropped (as the pipeline's
    defaults). With ``force_zeros_for_empty_prompt`` (SDXL's default) the unconditional input is zeros.
    """

    family = "sdxl"

    def __init__(self, *, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 force_zeros_for_empty_prompt: bool = True, **kw):
        super().__init__(denoiser=unet, scheduler=scheduler, vae=vae, text_encoders=(text_encoder, text_encoder_2),
                         tokenizers=(tokenizer, tokenizer_2), **kw)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return Conditioning(torch.cat(hidden, -1).to(self.dtype), pooled.to(self.dtype))

    def empty_prompt(self, n: int) -> Conditioning:
        if self._empty is None and self.force_zeros_for_empty_prompt:
            c = self.encode_prompt([""])
            self._empty = Conditioning(torch.zeros_like(c.embeds), torch.zeros_like(c.pooled))
        return super().empty_prompt(n)

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        h, w = (s * self.vae_scale_factor for s in x_t.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype).expand(x_t.shape[0], 6)
        return self.denoiser(x_t, t, encoder_hidden_states=cond.embeds,
                             added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}, **kw).sample

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder=None, **bkw):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        return cls(unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **mkw),
                   vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **mkw),
                   text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **mkw),
                   text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **mkw),
                   tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   tokenizer_2=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw),
                   scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
                   force_zeros_for_empty_prompt=bool((index or {}).get("force_zeros_for_empty_prompt", True)), **bkw)
