"""EmerDiff on a non-square photo through a model of another native resolution (128 px).

The model is a tiny Stable-Diffusion-topology pipeline with random weights, built and loaded like
conftest's ``sd_tiny`` but at 128 px (16x16 latents): the segments it gives are meaningless, only the
geometry is checked. The photo is scikit-image's ``coffee`` (400 x 600), letterboxed by default: the
results must come back at 400 x 600, and the gray border must take no part in the method.
"""
from __future__ import annotations

import pytest
import torch

from diffseg_utils import load_backbone
from diffseg_utils.emerdiff import _token_box, emerdiff_segment, kmeans_upsampled_features

skdata = pytest.importorskip("skimage.data", reason="the non-square test photo comes from scikit-image "
                                                     "(pip install scikit-image)")


@pytest.fixture(scope="module")
def sd128(tmp_path_factory):
    """SD 1.x topology, tiny widths, random weights, native resolution 128 px (UNet sample_size 16)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from topologies import sd15_text_config, sd15_unet_config, sd15_vae_config
    from diffseg_utils.toy.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("sd128")
    torch.manual_seed(0)
    tok = build_tokenizer(path / "_tok", model_max_length=16)
    unet = UNet2DConditionModel(**{**sd15_unet_config(tiny=True), "sample_size": 16})
    vae = AutoencoderKL(**{**sd15_vae_config(tiny=True), "sample_size": 128})
    text = CLIPTextModel(CLIPTextConfig(**sd15_text_config(tiny=True, vocab_size=len(tok)), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(path))
    bb = load_backbone(str(path), device="cpu")
    assert bb.resolution == 128 and bb.latent_resolution == 16
    return bb


@pytest.fixture(scope="module")
def coffee():
    img = skdata.coffee()
    assert img.shape == (400, 600, 3)
    return img


def test_labels_and_scores_at_the_photos_size_and_the_border_takes_no_segment(sd128, coffee):
    """Default layer (the 4x4 cross-attention level at 128 px): 2 of its 4 token rows lie on the letterbox
    border. k-means over all 16 tokens (before the border was masked) made 2 of K = 6 segments out of
    border tokens only on this photo; now every segment has tokens on the image, border tokens carry the
    nearest image token's id, and each difference map is normalised over the image's pixels."""
    K = 6
    res = emerdiff_segment(sd128, coffee, K, num_steps=4, progress=False)
    assert res.labels.shape == (1, 400, 600) and res.labels.dtype == torch.int64
    scores = res.scores
    assert scores.shape == (1, K, 400, 600) and scores.dtype == torch.float32
    g = res.geometry[0]
    assert (g.top, g.resized) == (21, (85, 128))            # rows 21..105 of the 128 px canvas show the photo
    # the border cannot take a segment: every k-means id lies on image tokens
    low = res.low_res[0]
    y0, y1, x0, x1 = _token_box(g, tuple(low.shape))
    assert (y0, y1, x0, x1) == (1, 3, 0, 4)                 # token centres 16 and 112 fall on the border
    on_image = set(low[y0:y1, x0:x1].unique().tolist())
    assert set(low.unique().tolist()) == on_image
    assert torch.equal(low[:y0], low[y0:y0 + 1].expand(y0, -1)) and torch.equal(low[y1:], low[y1 - 1:y1])
    assert set(res.labels.unique().tolist()) <= on_image
    # difference maps: zero on the border, each present map reaches its maximum 1 on the photo's pixels
    assert float(res.diffs[0, :, :21].abs().max()) == 0 and float(res.diffs[0, :, 106:].abs().max()) == 0
    for k in on_image:
        assert abs(float(res.diffs[0, k, 21:106].max()) - 1) < 1e-6
    # labels are the scores' argmax up to resampling (nearest vs bilinear; measured 95% on this photo)
    assert (scores[0].argmax(0) == res.labels[0]).float().mean() > 0.8
    # the upsampling baselines come back at the photo's size as well
    for mode in ("bilinear", "nearest"):
        assert res.upsampled_labels(mode).shape == (1, 400, 600)
    assert kmeans_upsampled_features(sd128, coffee, K, progress=False).shape == (1, 400, 600)


def test_finer_query_layer_crop_and_mixed_sizes(sd128, coffee):
    """A 16x16 query layer (3 token rows of border each side); fit='crop' leaves the unseen sides 255;
    images of different sizes give one label map per image, each at its own size."""
    fine = "up_blocks.3.attentions.0.transformer_blocks.0.attn2"
    res = emerdiff_segment(sd128, coffee, 4, query_layer=fine, num_steps=4, progress=False)
    low = res.low_res[0]
    assert low.shape == (16, 16) and _token_box(res.geometry[0], (16, 16)) == (3, 13, 0, 16)
    assert set(low.unique().tolist()) == set(low[3:13].unique().tolist())
    crop = emerdiff_segment(sd128, coffee, 4, fit="crop", num_steps=4, progress=False)
    lab = crop.labels[0]
    assert lab.shape == (400, 600) and bool((lab[:, :90] == 255).all()) and bool((lab[:, -90:] == 255).all())
    assert bool((lab[:, 110:490] != 255).all())
    mixed = emerdiff_segment(sd128, [coffee, coffee[:300, :200]], 4, num_steps=4, progress=False)
    assert isinstance(mixed.labels, list) and [tuple(x.shape) for x in mixed.labels] == [(400, 600), (300, 200)]
    assert [tuple(x.shape) for x in mixed.scores] == [(4, 400, 600), (4, 300, 200)]


def test_too_thin_an_image_for_k_segments_is_refused(sd128):
    """A 20 x 600 strip covers one row of the 4x4 token grid: 4 tokens cannot make 6 segments."""
    strip = torch.rand(3, 20, 600)
    with pytest.raises(ValueError, match="fewer than num_segments=6"):
        emerdiff_segment(sd128, strip, 6, num_steps=4, progress=False)
    assert emerdiff_segment(sd128, strip, 3, num_steps=4, progress=False).labels.shape == (1, 20, 600)
