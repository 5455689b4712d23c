"""Flux (dev / schnell): ``FluxTransformer2DModel``, double- then single-stream blocks over [text, image],
rotary positions, 2x2-packed latents, guidance embedding, flow matching with a resolution shift."""
from __future__ import annotations

import numpy as np
import torch

from .base import Backbone, Conditioning, tokens_to_map
from .transformer import TransformerMixin


def pack(x: torch.Tensor) -> torch.Tensor:
    """Latents ``(N, C, h, w)`` -> Flux tokens ``(N, h/2 * w/2, 4C)`` (2x2 patches, raster order)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux tokens ``(N, h/2 * w/2, 4C)`` -> latents ``(N, C, h, w)``."""
    n, _, c4 = tokens.shape
    return tokens.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's positions of the packed image tokens: ``(h/2 * w/2, 3)`` = (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxBackbone(TransformerMixin, Backbone):
    """Flux: token embeddings are T5's (``max_sequence_length`` tokens), the pooled vector CLIP's
    pooler output. Blocks: ``transformer_blocks.{i}`` (double-stream, "joint") and
    ``single_transformer_blocks.{i}`` ("single"); each one's image tokens are read on the packed
    grid ``(h/2, w/2)``. ``guidance`` is the distilled guidance fed to the guidance embedding
    (``guidance_embeds`` models, e.g. dev; the pipeline's default 3.5); schnell has none.
    """

    family = "flux"
    default_sample_size = 128  # 1024 px, Flux's native size (its config names none)
    block_lists = (("transformer_blocks", "joint"), ("single_transformer_blocks", "single"))

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 max_sequence_length: int = 512, guidance: float = 3.5, **kw):
        super().__init__(denoiser=transformer, scheduler=scheduler, vae=vae, text_encoders=(text_encoder, text_encoder_2),
                         tokenizers=(tokenizer, tokenizer_2), **kw)
        self.latent_channels = int(transformer.config.in_channels) // 4  # packed 2x2
        self.max_sequence_length = int(max_sequence_length)
        self.guidance = float(guidance)

    @property
    def prompt_tokenizer(self):
        return self.tokenizers[1]  # the embeds are T5's tokens

    def _denoiser_stride(self) -> int:
        return 2 * int(self.denoiser.config.patch_size)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_tok, t5_tok = self.tokenizers
        ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoders[0](ids, output_hidden_states=False).pooler_output
        ids = t5_tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                     return_tensors="pt").input_ids.to(self.device)
        embeds = self.text_encoders[1](ids, output_hidden_states=False)[0]
        return Conditioning(embeds.to(self.dtype), pooled.to(self.dtype))

    def _forward(self, x_t, t, cond, **kw) -> torch.Tensor:
        n, _, h, w = x_t.shape
        self._set_grid(x_t)
        guidance = (torch.full((n,), self.guidance, device=self.device, dtype=torch.float32)
                    if self.denoiser.config.guidance_embeds else None)
        out = self.denoiser(hidden_states=pack(x_t), encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                            timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
                            img_ids=image_ids(h, w, self.device, x_t.dtype),
                            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=x_t.dtype), **kw).sample
        return unpack(out, h, w)

    def read_block(self, output) -> torch.Tensor:
        tokens = output[1] if isinstance(output, tuple) else output
        return tokens_to_map(tokens[:, -self._grid[0] * self._grid[1]:], self._grid)

    def sampler(self, num_steps: int):
        """Flux's sigmas ``linspace(1, 1/num_steps)`` with the resolution-dependent shift ``mu`` (as the pipeline)."""
        s = type(self.scheduler).from_config(self.scheduler.config)
        cfg = s.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            seq = (self.latent_resolution // 2) ** 2
            m = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (
                cfg.get("max_image_seq_len", 4096) - cfg.get("base_image_seq_len", 256))
            mu = seq * m + cfg.get("base_shift", 0.5) - m * cfg.get("base_image_seq_len", 256)
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=self.device,
                        **({"mu": mu} if mu is not None else {}))
        return s

    @classmethod
    def from_pretrained(cls, root: str, index: dict | None, *, kw: dict, mkw: dict, has_subfolder=None, max_sequence_length: int = 512,
                        **bkw):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        return cls(transformer=FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", **mkw),
                   vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **mkw),
                   text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **mkw),
                   text_encoder_2=T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", **mkw),
                   tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", **kw),
                   tokenizer_2=AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", **kw),
                   scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **kw),
                   max_sequence_length=max_sequence_length, **bkw)
