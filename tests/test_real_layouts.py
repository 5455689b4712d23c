"""The shape logic on the full-size layouts users load (random weights built from the real configs).

Slow-ish (the SD 1.5 UNet has 860M parameters): one image, one timestep each.
"""
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffseg_utils.backbones import Backbone
from diffseg_utils.features import extract_features
from diffseg_utils.topologies import (ddpm256_unet_config, ddpm_scheduler_config, sd15_text_config, sd15_unet_config,
                                      sd15_vae_config)


@pytest.fixture(scope="module")
def sd15_full():
    from diffseg_utils.toy.tokenizer import build_tokenizer
    import tempfile

    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(), model_max_length=77)
    text_cfg = dict(sd15_text_config(tiny=True, vocab_size=len(tok)), hidden_size=768, projection_dim=768,
                    max_position_embeddings=77, num_attention_heads=12)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return Backbone(unet=UNet2DConditionModel(**sd15_unet_config()), vae=AutoencoderKL(**sd15_vae_config(tiny=True)),
                    text_encoder=text, tokenizer=tok, scheduler=sched, device="cpu")


@pytest.mark.slow
def test_sd15_layout_features(sd15_full):
    bb = sd15_full
    assert bb.resolution == 512 and bb.latent_resolution == 64
    b = bb.blocks()
    assert b["up_blocks.1.attentions.0"].resolution == (16, 16) and b["up_blocks.1.attentions.0"].channels == 1280
    assert b["up_blocks.3.attentions.2"].resolution == (64, 64) and b["up_blocks.3.attentions.2"].channels == 320
    names = ["up_blocks.1.attentions.0", "up_blocks.2.attentions.1", "up_blocks.3.attentions.2"]
    fm = extract_features(bb, torch.rand(1, 3, 512, 512), names, [100], progress=False)
    assert fm.channels == 1280 + 640 + 320 and fm.image_size == (512, 512)
    g = torch.Generator().manual_seed(0)
    img, y, x = torch.zeros(64, dtype=torch.long), torch.randint(0, 512, (64,), generator=g), torch.randint(0, 512, (64,), generator=g)
    f = fm.sample(img, y, x)
    assert f.shape == (64, 2240) and torch.isfinite(f).all()


@pytest.mark.slow
def test_ddpm256_layout_features():
    torch.manual_seed(0)
    bb = Backbone(unet=UNet2DModel(**ddpm256_unet_config()), scheduler=DDPMScheduler(**ddpm_scheduler_config()),
                  device="cpu")
    fm = extract_features(bb, torch.rand(1, 3, 256, 256), [5, 6, 7, 8, 12], [50], progress=False)
    assert fm.channels == 1408  # x 3 timesteps = DDPM-Seg's 4224 dims
    f = fm.sample(torch.zeros(10, dtype=torch.long), torch.arange(10) * 25, torch.arange(10) * 25)
    assert f.shape == (10, 1408) and torch.isfinite(f).all()
