"""Shared fixtures: tiny random diffusers models with the real checkpoints' topologies.

They are written with ``save_pretrained`` and loaded back through ``load_backbone``: the same
code path a real checkpoint takes (like diffusers' own ``get_dummy_components``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffseg_utils import load_backbone
from topologies import write_ddpm_like, write_sd_like

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# tests (and the notebook kernels nbval starts, which inherit this environment) never read or write the
# user's results/: every recorded metric goes to a fresh temporary folder of this test session
import tempfile  # noqa: E402

os.environ["DIFFSEG_RESULTS"] = tempfile.mkdtemp(prefix="diffseg-test-results-")
os.environ.pop("DIFFSEG_RECORD_EXPECTED", None)  # nbval compares with the committed numbers, never records them
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sd_tiny_dir(tmp_path_factory) -> Path:
    return write_sd_like(tmp_path_factory.mktemp("sd_tiny"), tiny=True, seed=0)


@pytest.fixture(scope="session")
def ddpm_tiny_dir(tmp_path_factory) -> Path:
    return write_ddpm_like(tmp_path_factory.mktemp("ddpm_tiny"), tiny=True, seed=0)


@pytest.fixture(scope="session")
def sd_tiny(sd_tiny_dir):
    return load_backbone(str(sd_tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def ddpm_tiny(ddpm_tiny_dir):
    return load_backbone(str(ddpm_tiny_dir), device="cpu")



@pytest.fixture(scope="session")
def sd3_micro(tmp_path_factory):
    """A micro SD3 (4 joint blocks, qk RMS-norm, no T5) on the repo's offline tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffseg_utils.backbones import SD3Backbone
    from diffseg_utils.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"), model_max_length=16)
    clip = lambda: CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                               qk_norm="rms_norm")
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return SD3Backbone(transformer=tr, vae=vae, text_encoder=clip(), text_encoder_2=clip(), tokenizer=tok,
                       tokenizer_2=tok, scheduler=FlowMatchEulerDiscreteScheduler(), max_sequence_length=0,
                       device="cpu")


# ---------------------------------------------------------------- full-size layouts (random weights)
@pytest.fixture(scope="session")
def sd15_full():
    """The full-size SD 1.5 UNet topology (860M parameters, random weights) with a tiny VAE and a
    768-d text encoder on our own tokenizer: the channel and resolution layout users will load."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffseg_utils.backbones import SDBackbone
    from topologies import sd15_text_config, sd15_unet_config, sd15_vae_config
    from diffseg_utils.toy.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(tempfile.mkdtemp(), model_max_length=77)
    text_cfg = dict(sd15_text_config(tiny=True, vocab_size=len(tok)), hidden_size=768, projection_dim=768,
                    max_position_embeddings=77, num_attention_heads=12)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return SDBackbone(unet=UNet2DConditionModel(**sd15_unet_config()), vae=AutoencoderKL(**sd15_vae_config(tiny=True)),
                    text_encoder=text, tokenizer=tok, scheduler=sched, device="cpu")


@pytest.fixture(scope="session")
def ddpm256_full():
    """The google DDPM-256 (bedroom/cat/church) UNet2DModel topology with random weights."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffseg_utils.backbones import PixelBackbone
    from topologies import ddpm256_unet_config, ddpm_scheduler_config

    torch.manual_seed(0)
    return PixelBackbone(unet=UNet2DModel(**ddpm256_unet_config()), scheduler=DDPMScheduler(**ddpm_scheduler_config()),
                    device="cpu")


NBVAL_OUTPUT_TIMEOUT = 60
"""Seconds nbval waits for a kernel's output messages once a cell has returned (nbval's own: 5). On the 2-core
machine the full suite once exceeded 5 s after notebook 04's protocol II cell (123 s of segmenter training, the
suite's 19th minute), failing a cell that had run correctly; the same notebook passes alone."""


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's notebook cells
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
