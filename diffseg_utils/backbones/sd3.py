"""SD3 / SD3.5 (and the toy MM-DiT): ``SD3Transformer2DModel``, joint attention over [image, text], flow matching."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backbone, Conditioning
from .transformer import TransformerMixin


class SD3Backbone(TransformerMixin, Backbone):
    """SD3: two CLIP encoders (penultimate hidden states side by side, zero-padded to the joint width)
    followed by T5's tokens (or, without T5, ``max_sequence_length`` zero tokens, as the pipeline
    does); pooled = both CLIPs' projected end-of-text states. Blocks ``transformer_blocks.{i}``
    are joint blocks; their image tokens are the feature maps.
    """

    family = "sd3"
    block_lists = (("transformer_blocks", "joint"),)

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 text_encoder_3=None, tokenizer_3=None, max_sequence_length: int = 256, **kw):
        encoders = (text_encoder, text_encoder_2) + ((text_encoder_3,) if text_encoder_3 is not None else ())
        tokenizers = (tokenizer, tokenizer_2) + ((tokenizer_3,) if text_encoder_3 is not None else ())
        super().__init__(denoiser=transformer, scheduler=scheduler, vae=vae, text_encoders=encoders,
                         tokenizers=tokenizers, **kw)
        self.max_sequence_length = int(max_sequence_length)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_len = self.tokenizers[0].model_max_length  # the pipeline uses the first tokenizer's length for both
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        width = int(self.denoiser.config.joint_attention_dim)
        clip = F.pad(torch.cat(hidden, -1), (0, width - sum(h.shape[-1] for h in hidden)))
        if len(self.text_encoders) == 3:
            ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoders[2](ids.to(self.device))[0]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, width)
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], 1).to(self.dtype), torch.cat(pooled, -1).to(self.dtype))

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        self._set_grid(x_t)
        return self.denoiser(hidden_states=x_t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                             timestep=t, **kw).sample

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder=None, max_sequence_length: int = 256,
                        **bkw):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        has_t5 = bool(index and (index.get("text_encoder_3") or [None])[0])
        return cls(transformer=SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", **mkw),
                   vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **mkw),
                   text_encoder=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder", **mkw),
                   text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **mkw),
                   text_encoder_3=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3", **mkw) if has_t5 else None,
                   tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   tokenizer_2=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw),
                   tokenizer_3=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_3", **kw) if has_t5 else None,
                   scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **kw),
                   max_sequence_length=max_sequence_length, **bkw)
