"""PixArt-Σ (and -α): ``PixArtTransformer2DModel``, self-attention + cross-attention to T5 tokens, DDPM schedule."""
from __future__ import annotations

import torch

from .base import Backbone, Conditioning
from .transformer import TransformerMixin


class PixArtBackbone(TransformerMixin, Backbone):
    """PixArt: T5 token embeddings with their attention mask (``max_sequence_length``: 300 for Σ,
    120 for α); blocks ``transformer_blocks.{i}`` (``BasicTransformerBlock``: ``attn1`` self,
    ``attn2`` cross). The denoiser also predicts its variance (learned sigma): :meth:`predict`
    returns the epsilon half only.
    """

    family = "pixart"

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 300, **kw):
        super().__init__(denoiser=transformer, scheduler=scheduler, vae=vae, text_encoders=(text_encoder,),
                         tokenizers=(tokenizer,), **kw)
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        embeds = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]
        return Conditioning(embeds.to(self.dtype), mask=mask)

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        self._set_grid(x_t)
        out = self.denoiser(x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **kw).sample
        return out[:, : x_t.shape[1]] if out.shape[1] == 2 * x_t.shape[1] else out

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder=None, max_sequence_length: int = 300,
                        **bkw):
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import AutoTokenizer, T5EncoderModel

        return cls(transformer=PixArtTransformer2DModel.from_pretrained(root, subfolder="transformer", **mkw),
                   vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **mkw),
                   text_encoder=T5EncoderModel.from_pretrained(root, subfolder="text_encoder", **mkw),
                   tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
                   max_sequence_length=max_sequence_length, **bkw)
