"""Configs of the real checkpoints' topologies, for random-weight tests and benchmarks.

These mirror the published configs of Stable Diffusion 1.5 and google/ddpm-ema-*-256 so the
shape logic can be proven on the layouts users load, without their weights. ``tiny=True``
keeps the topology (block types, levels, layers per block, attention placement) and shrinks
the widths so a model builds and runs in milliseconds.
"""
from __future__ import annotations

import json
from pathlib import Path


def sd15_unet_config(tiny: bool = False) -> dict:
    """UNet2DConditionModel config of SD 1.x (64x64x4 latents, cross-attention at 64/32/16)."""
    return dict(
        sample_size=8 if tiny else 64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16, 16) if tiny else (320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=16 if tiny else 768, attention_head_dim=2 if tiny else 8,
        norm_num_groups=8 if tiny else 32,
    )


def sd15_vae_config(tiny: bool = False) -> dict:
    """AutoencoderKL config of SD 1.x (f = 8, 4 latent channels, scaling 0.18215)."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2, latent_channels=4, norm_num_groups=8 if tiny else 32,
        sample_size=64 if tiny else 512, scaling_factor=0.18215,
    )


def sd15_text_config(tiny: bool = False, vocab_size: int = 49408) -> dict:
    """CLIPTextConfig kwargs of SD 1.x's CLIP ViT-L/14 text tower."""
    if tiny:
        return dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=16, projection_dim=16)
    return dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768)


def ddpm256_unet_config(tiny: bool = False) -> dict:
    """UNet2DModel config of google/ddpm-ema-{bedroom,cat,church,celebahq}-256 (ADM-like, 6 levels)."""
    return dict(
        sample_size=64 if tiny else 256, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(8, 8, 16, 16, 32, 32) if tiny else (128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=8 if tiny else 32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, attention_head_dim=None,
    )


def ddpm_scheduler_config() -> dict:
    """google/ddpm-*'s DDPM schedule: 1000 linear betas 1e-4..0.02, epsilon prediction."""
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")


def write_sd_like(path: str | Path, tiny: bool = True, seed: int = 0) -> Path:
    """Save a random-weight SD-1.x-topology pipeline (own tokenizer) with ``save_pretrained``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffseg_utils.toy.tokenizer import build_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tok = build_tokenizer(path / "_tok", model_max_length=16 if tiny else 77)
    unet = UNet2DConditionModel(**sd15_unet_config(tiny))
    vae = AutoencoderKL(**sd15_vae_config(tiny))
    text = CLIPTextModel(CLIPTextConfig(**sd15_text_config(tiny, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def write_ddpm_like(path: str | Path, tiny: bool = True, seed: int = 0) -> Path:
    """Save a random-weight google-DDPM-256-topology UNet2DModel + scheduler like the hub repos (root layout)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the hub repos keep the UNet at the root: config.json + weights + scheduler_config.json
    UNet2DModel(**ddpm256_unet_config(tiny)).save_pretrained(str(path))
    DDPMScheduler(**ddpm_scheduler_config()).save_pretrained(str(path))
    (path / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.0", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}))
    return path
