"""Every method on the full-size layouts users load (random weights built from the real configs).

Slow-ish (the SD 1.5 UNet has 860M parameters): one image and tiny budgets each; the fixtures
``sd15_full`` and ``ddpm256_full`` live in conftest.py and are built once per session.
"""
import numpy as np
import pytest
import torch

from diffseg_utils.backbones import adm_blocks
from diffseg_utils.ddpmseg import FewShotSegmenter
from diffseg_utils.emerdiff import emerdiff_segment
from diffseg_utils.features import extract_features
from diffseg_utils.pixel_classifier import EnsembleConfig


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
def test_ddpm256_layout_features(ddpm256_full):
    bb = ddpm256_full
    fm = extract_features(bb, torch.rand(1, 3, 256, 256), [5, 6, 7, 8, 12], [50], progress=False)
    assert fm.channels == 1408  # x 3 timesteps = DDPM-Seg's 4224 dims
    f = fm.sample(torch.zeros(10, dtype=torch.long), torch.arange(10) * 25, torch.arange(10) * 25)
    assert f.shape == (10, 1408) and torch.isfinite(f).all()


@pytest.mark.slow
def test_ddpm256_ensemble_fits_on_paper_blocks(ddpm256_full):
    """DDPM-Seg's 4224-dim path (blocks 5,6,7,8,12 x t 50,150,250) trains and predicts (tiny budget)."""
    bb = ddpm256_full
    assert adm_blocks(bb.denoiser, [5, 6, 7, 8, 12])[-1].startswith("up_blocks")
    cfg = EnsembleConfig(num_classes=3, num_members=2, max_steps=3)
    seg = FewShotSegmenter(bb, [5, 6, 7, 8, 12], [50, 150, 250], 3, config=cfg, batch_size=1)
    img = torch.rand(1, 3, 256, 256)
    labels = np.zeros((1, 256, 256), np.int64)
    labels[:, 100:200, 50:150], labels[:, :40] = 1, 2
    fm = seg.features(img)
    assert fm.channels == 4224
    seg.fit(None, labels, features=fm, max_pixels=512, progress=False)
    out = seg.predict(features=fm)
    assert out.labels.shape == (1, 256, 256) and out.uncertainty.shape == (1, 256, 256)


@pytest.mark.slow
def test_sd15_emerdiff_runs_at_512(sd15_full):
    """EmerDiff on SD 1.5's layout: the 16x16 cross-attention level is found, K = 2, two denoising steps."""
    res = emerdiff_segment(sd15_full, torch.rand(1, 3, 512, 512), 2, num_steps=500, t_m=2,
                           chunk_size=4, progress=False)
    assert res.layer == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert res.low_res.shape == (1, 16, 16) and res.pixels.shape == (1, 512, 512)
    assert res.labels.shape == (1, 512, 512)
    assert len(res.extra["timesteps"]) == 2


@pytest.mark.slow
def test_ddpm256_emerdiff_uses_self_attention(ddpm256_full):
    res = emerdiff_segment(ddpm256_full, torch.rand(1, 3, 256, 256), 2, num_steps=500, t_m=2,
                           chunk_size=4, progress=False)
    # google's DDPM-256 has attention only in up_blocks[1] (16x16): its first self-attention block is
    # both the k-means layer and the modulated one; a 8x8 or 32x32 level would give another low_res grid
    assert res.layer == res.extra["query_layer"] == "up_blocks.1.attentions.0"
    assert res.low_res.shape == (1, 16, 16)
    assert res.pixels.shape == (1, 256, 256) and res.labels.shape == (1, 256, 256)
