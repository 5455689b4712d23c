"""Architectures of the tiny Stable Diffusion (VAE, UNet, text encoder, scheduler).

The components are the very diffusers / transformers classes SD 1.x uses, scaled down for
64x64 images: an AutoencoderKL with f = 4 (64x64x3 -> 16x16x4 latents) and a
UNet2DConditionModel at 16/8/4 latent resolution with cross-attention at 16 and 8.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ToySDConfig:
    # VAE: f = 2 ** (len(vae_channels) - 1) = 4. GroupNorm with ONE group: per-group
    # normalisation (SD's 32 groups) erases the flat background colours of the toy world and
    # stalled training at ~14 dB in short runs; one group (layer-norm-like) trains fast.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 1
    latent_channels: int = 4
    image_size: int = 64
    # UNet on 16x16 latents: levels 16, 8, 4; cross-attention at 16 and 8 (like SD's 64/32/16)
    # (32, 64, 64): ~1.5M params, ~1 s per batch of 64 on 2 CPU cores; (64, 128, 128) is 1.8x slower
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_norm_groups: int = 16
    # text encoder: a 2-layer CLIP text transformer over the locally built tokenizer
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


MICRO = ToySDConfig(vae_channels=(8, 8, 8), unet_channels=(8, 16, 16), unet_heads=2, unet_norm_groups=8,
                    text_hidden=16, text_layers=1, text_heads=2)
"""A micro configuration for smoke tests (seconds on CPU)."""


def build_vae(cfg: ToySDConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups, sample_size=cfg.image_size, mid_block_add_attention=False,
    )


def build_unet(cfg: ToySDConfig):
    from diffusers import UNet2DConditionModel

    f = 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // f, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_text_encoder(cfg: ToySDConfig, vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                        max_position_embeddings=cfg.max_tokens, projection_dim=cfg.text_hidden,
                        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(tc)


def build_scheduler():
    """SD 1.x's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


@dataclass
class PixelDDPMConfig:
    """The tiny unconditional pixel DDPM of the faces world (DDPM-Seg's setting, scaled down).

    A diffusers ``UNet2DModel`` on 64x64 RGB: levels 64, 32, 16, 8 with self-attention at 8 only
    (attention at 64 or 32 would dominate the CPU cost). (16, 32, 64, 96) measured 0.57 s per
    training step at batch 32 on the 2 CPU cores; 1.8 M parameters.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 96)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    head_dim: int = 16
    norm_groups: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


PIXEL_MICRO = PixelDDPMConfig(image_size=16, channels=(8, 16), attention_levels=(False, True), head_dim=8,
                              norm_groups=8)
"""A micro pixel configuration for smoke tests (seconds on CPU)."""


def build_pixel_unet(cfg: PixelDDPMConfig):
    from diffusers import UNet2DModel

    att = cfg.attention_levels
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3, block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups, attention_head_dim=cfg.head_dim,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in att),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
    )


def build_pixel_scheduler():
    """DDPM's / ADM's linear schedule (betas 1e-4..0.02, 1000 steps, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True)


@dataclass
class ToySD3Config:
    """The toy MM-DiT: an SD3-architecture transformer on the toy SD's latents and text encoder.

    ``SD3Transformer2DModel`` on 16x16x4 latents with patch size 1, so the token grid is 16x16 (the
    toy UNet's finest level; patch 2 would leave 8x8 tokens for 64 px images). qk RMS-norm as in
    SD3.5. The two CLIP slots both hold the toy SD's frozen text encoder (width 64 each, so 128 per
    token after SD3's concatenation); there is no T5 (``max_sequence_length`` zero tokens stand in
    for it: 0 here, so a prompt is its 16 CLIP tokens). Measured alone on the 2 CPU cores: 0.59 s
    per training step at batch 32 (6 layers, width 128, 3.5 M parameters); patch 2 runs at 0.34 s
    at batch 64 but with a 4x coarser token grid.
    """

    sample_size: int = 16
    patch_size: int = 1
    num_layers: int = 6
    head_dim: int = 32
    heads: int = 4
    qk_norm: str | None = "rms_norm"
    text_width: int = 128  # two CLIP slots of width 64, concatenated
    max_sequence_length: int = 0  # the T5 slot: SD3 fills it with zeros when there is no T5
    latent_channels: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


SD3_MICRO = ToySD3Config(num_layers=1, head_dim=8, heads=2)
"""A micro MM-DiT for smoke tests (seconds on CPU)."""


def build_sd3_transformer(cfg: ToySD3Config):
    from diffusers import SD3Transformer2DModel

    width = cfg.head_dim * cfg.heads
    return SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=cfg.text_width, caption_projection_dim=width,
        pooled_projection_dim=cfg.text_width, pos_embed_max_size=cfg.sample_size, qk_norm=cfg.qk_norm,
    )


def build_flow_scheduler():
    """SD3's rectified-flow scheduler; shift 1 (SD3's shift of 3 is for 1024 px images)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
