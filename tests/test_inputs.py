import numpy as np
import pytest
import torch
from PIL import Image

from diffseg_utils import prepare_images


def test_modes_and_layouts_agree():
    rgb = (np.random.default_rng(0).uniform(size=(40, 40, 3)) * 255).astype(np.uint8)
    a = prepare_images(Image.fromarray(rgb), 32)
    b = prepare_images(rgb, 32)
    c = prepare_images(torch.from_numpy(rgb).permute(2, 0, 1), 32)
    d = prepare_images(rgb.astype(np.float32) / 255, 32)
    for t in (b, c, d):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=0)
    assert a.shape == (1, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_gray_rgba_and_batches():
    gray = np.full((16, 16), 128, np.uint8)
    g = prepare_images(Image.fromarray(gray), 16)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent -> white
    assert torch.allclose(prepare_images(rgba, 16), torch.ones(1, 3, 16, 16))
    batch = prepare_images([np.zeros((20, 30, 3), np.uint8), Image.new("RGB", (64, 48))], 16)
    assert batch.shape == (2, 3, 16, 16)
    assert prepare_images(torch.rand(4, 3, 8, 8), 8, multiple=8).shape == (4, 3, 8, 8)


def test_resize_policy_shorter_side_then_centre_crop():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 16:48] = 255  # a white centre band, as wide as the crop
    out = prepare_images(img, 32, out_range=(0, 1))
    assert out.shape == (1, 3, 32, 32) and out[..., 2:-2].min() > 0.95


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 5), np.uint8), "got 5"),
    (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
    (np.full((10, 10, 3), -0.5, np.float32), "value_range"),
    (np.zeros((2, 2, 10, 10, 3)), "HxW"),
    ("image.png", "expected a PIL image"),
    ([], "no images"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_images(bad, 16)


def test_size_must_fit_the_unet():
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_images(np.zeros((40, 40, 3), np.uint8), 48, multiple=32)


def test_backbone_preprocess(sd_tiny):
    x = sd_tiny.preprocess(Image.new("RGBA", (100, 80)))
    assert x.shape == (1, 3, 64, 64) and x.dtype == sd_tiny.dtype
