"""Pipeline directories of today's backbone families at their real configurations, random weights.

Each mirrors the published config of its checkpoint — widths, head dims, patch size, joint /
cross-attention widths, text-encoder widths, added conditioning — with two things reduced so a
forward takes seconds on a CPU: the number of layers (transformer blocks, text-encoder layers,
UNet layers per level) and ``sample_size`` (the latent side the dry run uses; every width is
real). Text encoders use this repo's small offline tokenizer (583 tokens) in every slot, T5's
included, so the vocabulary is the only other thing that differs. Written with
``save_pretrained`` and read back by ``load_backbone(dir)``: the real checkpoint's code path.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _tokenizer(path: Path, max_len: int = 77):
    from diffseg_utils.toy.tokenizer import build_tokenizer

    return build_tokenizer(path / "_tok", model_max_length=max_len)


def _clip(tok, hidden: int, heads: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
                         hidden_act="gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(tok):
    """T5-v1.1-XXL's encoder widths (d_model 4096, 64 heads of 64, gated-GELU FF 10240), one layer."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))


def _vae(latent_channels: int, scaling: float, shift: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=32,
                         scaling_factor=scaling, shift_factor=shift)


def write_sdxl(path: Path, sample_size: int = 16) -> Path:
    """SDXL base 1.0: UNet (320, 640, 1280), head dims 5/10/20 x 64, cross-attention 2048, text_time added
    conditioning (pooled 1280 + 6 time ids x 256 = 2816), CLIP-L 768 + CLIP-G 1280 (1 layer per level here)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _tokenizer(path)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 1, 1), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(4, 0.13025, None), text_encoder=_clip(tok, 768, 12, False),
                                     text_encoder_2=_clip(tok, 1280, 20, True), tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return path


def write_sd3(path: Path, sample_size: int = 16, version: str = "3.5-medium") -> Path:
    """SD3-medium (24 heads x 64, caption projection 1536, patch 2, 16 latent channels) or SD3.5-medium
    (the same widths with qk RMS-norm and MMDiT-X dual attention); CLIP-L, CLIP-G and T5-XXL widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = _tokenizer(path)
    tr = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384 if version == "3.5-medium" else 192,
        qk_norm="rms_norm" if version == "3.5-medium" else None,
        dual_attention_layers=(0,) if version == "3.5-medium" else ())
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16, 1.5305, 0.0609),
        text_encoder=_clip(tok, 768, 12, True), tokenizer=tok, text_encoder_2=_clip(tok, 1280, 20, True),
        tokenizer_2=tok, text_encoder_3=_t5(tok), tokenizer_3=tok)
    pipe.save_pretrained(path)
    return path


def write_flux(path: Path) -> Path:
    """FLUX.1-dev: 24 heads x 128 (width 3072), joint width 4096 (T5-XXL), pooled 768 (CLIP-L), rotary axes
    (16, 56, 56), guidance embedding, 64 packed channels; one double- and one single-stream block here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok = _tokenizer(path)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=_vae(16, 0.3611, 0.1159),
                        text_encoder=_clip(tok, 768, 12, False), tokenizer=tok, text_encoder_2=_t5(tok), tokenizer_2=tok)
    pipe.save_pretrained(path)
    return path


def write_pixart(path: Path, sample_size: int = 16) -> Path:
    """PixArt-Σ XL-2: 16 heads x 72 (width 1152), patch 2, caption channels 4096 (T5-XXL), adaLN-single,
    learned sigma (8 output channels); two blocks here."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tok = _tokenizer(path)
    tr = PixArtTransformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                  num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152,
                                  caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                  norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=2)
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = PixArtSigmaPipeline(transformer=tr, scheduler=sched, vae=_vae(4, 0.13025, None), text_encoder=_t5(tok),
                               tokenizer=tok)
    pipe.save_pretrained(path)
    return path


WRITERS = {"sdxl": write_sdxl, "sd3": write_sd3, "flux": write_flux, "pixart": write_pixart}
