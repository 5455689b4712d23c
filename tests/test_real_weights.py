"""The same code on real checkpoints, when their weights are in the local HF cache.

Run with ``pytest -m real_weights`` on a machine that has them (a GPU helps); skipped here.
"""
import pytest
import torch

from diffseg_utils import adm_blocks, load_backbone



def hf_cached(repo_id: str) -> bool:
    """True when a hub repo has a snapshot in the local HF cache."""
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:
        return False

SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DDPM = "google/ddpm-ema-bedroom-256"


@pytest.mark.real_weights
@pytest.mark.skipif(not hf_cached(SD), reason=f"{SD} is not in the local Hugging Face cache")
def test_sd15_loads_and_reports_its_layout():
    bb = load_backbone("sd-1.5")
    assert bb.kind == "latent" and bb.resolution == 512
    b = bb.blocks()
    assert b["up_blocks.1.attentions.0"].resolution == (16, 16) and b["up_blocks.1.attentions.0"].channels == 1280
    z = bb.encode(bb.preprocess(torch.rand(1, 3, 512, 512)))
    assert z.shape == (1, 4, 64, 64)


@pytest.mark.real_weights
@pytest.mark.skipif(not hf_cached(DDPM), reason=f"{DDPM} is not in the local Hugging Face cache")
def test_ddpm_bedroom_ddpmseg_blocks():
    bb = load_backbone("ddpm-bedroom")
    assert bb.kind == "pixel" and bb.resolution == 256
    b = bb.blocks()
    assert sum(b[n].channels for n in adm_blocks(bb.denoiser, [5, 6, 7, 8, 12])) * 3 == 4224
