import numpy as np
import pytest
import torch

from diffseg_utils.attention import ControlledAttnProcessor, attention_layers, finer_up_layer, low_res_query_layer
from diffseg_utils.emerdiff import (_denoise_timesteps, emerdiff_segment, gaussian_blur, kmeans,
                                    reference_modulated_run, upsample_segments)
from diffseg_utils.hooks import AttentionProcessors


@pytest.mark.parametrize("which", ["sd_tiny", "ddpm_tiny"])
def test_processor_is_exact_and_restored(which, request):
    bb = request.getfixturevalue(which)
    x = torch.randn(2, bb.latent_channels, bb.latent_resolution, bb.latent_resolution)
    ref = bb.unet_forward(x, 50)
    procs = lambda: {n: m.processor for n, m in bb.unet.named_modules() if hasattr(m, "set_processor")}
    originals = procs()
    with AttentionProcessors(bb.unet, {a.path: ControlledAttnProcessor() for a in attention_layers(bb)}):
        torch.testing.assert_close(bb.unet_forward(x, 50), ref, atol=1e-5, rtol=1e-5)
    assert procs() == originals  # the very same processor objects are back
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionProcessors(bb.unet, {a.path: ControlledAttnProcessor() for a in attention_layers(bb)}):
            raise RuntimeError("boom")
    assert procs() == originals  # the very same processor objects are back
    torch.testing.assert_close(bb.unet_forward(x, 50), ref)


def test_level_selection(sd_tiny, ddpm_tiny):
    a = low_res_query_layer(sd_tiny)
    assert a.path == "up_blocks.1.attentions.0.transformer_blocks.0.attn2" and a.cross  # SD's rule
    b = low_res_query_layer(ddpm_tiny)
    assert b.path == "up_blocks.1.attentions.0" and not b.cross  # self-attention only UNet
    f = finer_up_layer(sd_tiny)
    assert f.cross and f.resolution[0] > a.resolution[0] and f.path.startswith("up_blocks.")


@pytest.mark.parametrize("which,finer", [("sd_tiny", False), ("ddpm_tiny", False), ("sd_tiny", True)])
def test_batched_equals_reference_loop_and_lambda_zero(which, finer, request):
    """Batched == one run at a time == the plain reference; finer=True modulates a finer level than
    the k-means level (segments nearest-resized to it)."""
    bb = request.getfixturevalue(which)
    img = torch.rand(1, 3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(1))
    kw = dict(num_segments=3, num_inference_steps=8, return_images=True, progress=False)
    if finer:
        kw["modulate_layer"] = finer_up_layer(bb).path
    big = emerdiff_segment(bb, img, chunk_size=16, **kw)
    small = emerdiff_segment(bb, img, chunk_size=1, **kw)
    torch.testing.assert_close(big.images_plus, small.images_plus, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(big.diffs, small.diffs, atol=1e-4, rtol=1e-4)
    # argmax over near-equal difference maps may flip a tie-pixel between batch sizes (float rounding)
    assert (big.pixels == small.pixels).float().mean() > 0.999
    # the straightforward reference: full UNet on [unmodulated, modulated], no shared prefix
    x = bb.preprocess(img)
    z0 = bb.encode(x)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    sched, ts = _denoise_timesteps(bb, 281, 8)
    k = int(torch.unique(big.low_res[0])[0])
    mask = (big.low_res[0] == k).float()
    if finer:
        mask = torch.nn.functional.interpolate(mask[None, None], size=finer_up_layer(bb).resolution, mode="nearest")[0, 0]
        assert big.layer == kw["modulate_layer"]
    ref = bb.decode(reference_modulated_run(bb, bb.add_noise(z0, 281, eps), mask, -1.0, 10.0, ts, sched, big.layer, True))
    torch.testing.assert_close(ref[0].float(), big.images_minus[0, k], atol=1e-4, rtol=1e-4)
    zero = emerdiff_segment(bb, img, lam=0.0, **kw)
    torch.testing.assert_close(zero.images_plus, zero.images_minus, atol=1e-5, rtol=0)  # up to float rounding
    assert big.unet_evals_per_image == big.min_unet_evals_per_image


def test_kmeans_and_blur():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g) + 10, torch.randn(50, 4, generator=g) - 10])
    labels, c = kmeans(x, 2, seed=0)
    assert len(set(labels[:50].tolist())) == 1 and len(set(labels[50:].tolist())) == 1 and labels[0] != labels[-1]
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 4] = 1
    b = gaussian_blur(img, 5, 3.0)
    assert abs(float(b.sum()) - 1) < 1e-5 and b[0, 0, 4, 4] == b.max()


def test_upsample_baselines():
    low = torch.tensor([[[0, 1], [2, 2]]])
    near = upsample_segments(low, (4, 4), "nearest")
    assert near[0, 0].tolist() == [0, 0, 1, 1]
    bil = upsample_segments(low, (4, 4), "bilinear")
    assert bil.shape == (1, 4, 4) and set(bil.unique().tolist()) <= {0, 1, 2}


def test_bad_layer(sd_tiny):
    with pytest.raises(ValueError, match="not an attention layer"):
        emerdiff_segment(sd_tiny, torch.rand(1, 3, 64, 64), modulate_layer="up_blocks.9", progress=False)
