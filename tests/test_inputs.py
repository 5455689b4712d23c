import typing

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from diffseg_utils import prepare_images
from diffseg_utils.inputs import (Geometry, ImageLike, geometry_of, prepare_labels, restore_labels)


def test_modes_and_layouts_agree():
    rgb = (np.random.default_rng(0).uniform(size=(40, 40, 3)) * 255).astype(np.uint8)
    a = prepare_images(Image.fromarray(rgb), 32)
    b = prepare_images(rgb, 32)
    c = prepare_images(torch.from_numpy(rgb).permute(2, 0, 1), 32)
    d = prepare_images(rgb.astype(np.float32) / 255, 32)
    e = prepare_images(rgb.astype(np.int32), 32)                       # other int dtypes: 0..255 like uint8
    f = prepare_images(torch.from_numpy(rgb).permute(2, 0, 1).to(torch.int64), 32)
    for t in (b, c, d, e, f):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=0)
    assert a.shape == (1, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_image_like_is_a_real_alias():
    assert set(typing.get_args(ImageLike)) == {PIL.Image.Image, np.ndarray, torch.Tensor}


def test_gray_rgba_and_batches():
    gray = np.full((16, 16), 128, np.uint8)
    g = prepare_images(Image.fromarray(gray), 16)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent -> white
    assert torch.allclose(prepare_images(rgba, 16), torch.ones(1, 3, 16, 16))
    batch = prepare_images([np.zeros((20, 30, 3), np.uint8), Image.new("RGB", (64, 48))], 16)
    assert batch.shape == (2, 3, 16, 16)
    assert prepare_images(torch.rand(4, 3, 8, 8), 8, multiple=8).shape == (4, 3, 8, 8)


def test_pil_modes_are_converted_to_rgb_as_documented():
    rgb = (np.random.default_rng(1).uniform(size=(16, 16, 3)) * 255).astype(np.uint8)
    pal = Image.fromarray(rgb).convert("P")                                       # palette -> RGB
    torch.testing.assert_close(prepare_images(pal, 16), prepare_images(np.asarray(pal.convert("RGB")), 16))
    la = Image.fromarray(np.stack([np.zeros((16, 16), np.uint8)] * 2, -1), "LA")  # transparent black -> white
    assert torch.allclose(prepare_images(la, 16), torch.ones(1, 3, 16, 16))
    i16 = Image.fromarray(np.full((16, 16), 65535, np.uint16))                   # 16-bit gray: 0..65535
    assert torch.allclose(prepare_images(i16, 16), torch.ones(1, 3, 16, 16))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert prepare_images(cmyk, 16).shape == (1, 3, 16, 16)


def test_float_overshoot_within_tolerance_is_clipped():
    x = np.full((8, 8, 3), 1.0005, np.float32)  # bicubic ringing from another library
    assert torch.allclose(prepare_images(x, 8), torch.ones(1, 3, 8, 8))
    y = np.full((8, 8, 3), -1.0, np.float32)
    assert torch.allclose(prepare_images(y, 8, value_range=(-1, 1)), -torch.ones(1, 3, 8, 8))


def _with(value, dtype, shape=(10, 10, 3)):
    a = np.zeros(shape, dtype)
    a[0, 0, 0] = value
    return a


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 5), np.uint8), "got 5"),
    (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
    (_with(np.inf, np.float32), "inf"),                                 # was: a flat white image
    (_with(-np.inf, np.float64), "inf"),
    (torch.from_numpy(_with(np.inf, np.float32)).permute(2, 0, 1), "inf"),
    (np.full((10, 10, 3), -0.5, np.float32), "value_range"),
    (np.full((10, 10, 3), 255.0, np.float32), "divide 0..255 floats by 255"),
    (_with(1000, np.int32), r"int32 must hold values in 0\.\.255; got 0\.\.1000"),  # was: [-1, 6.8] to the model
    (_with(-5, np.int16), r"int16 must hold values in 0\.\.255; got -5\.\.0"),      # was: accepted
    (torch.from_numpy(_with(1000, np.int32)).permute(2, 0, 1), r"0\.\.255; got 0\.\.1000"),
    (np.zeros((10, 10), bool), "boolean"),
    (torch.zeros(3, 10, 10, dtype=torch.bool), "boolean"),
    (np.zeros((10, 10, 3), np.complex64), "unsupported"),
    (np.zeros((2, 2, 10, 10, 3)), "HxW"),
    ("image.png", "expected a PIL image"),
    ([], "no images"),
    (np.zeros((0, 10, 10, 3), np.uint8), "no images"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prepare_images(bad, 16)


def test_bad_fit_and_size():
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_images(np.zeros((40, 40, 3), np.uint8), 48, multiple=32)
    with pytest.raises(ValueError, match="fit must be one of"):
        prepare_images(np.zeros((40, 40, 3), np.uint8), 32, fit="letterbox")


# ---------------------------------------------------------------- geometry
def _band_image(h=32, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, w // 4:3 * w // 4] = 255  # a white centre band, as wide as the crop
    img[:, :4, 0] = 255              # a red strip at the far left: outside a centre crop
    return img


def test_crop_keeps_the_old_policy():
    out = prepare_images(_band_image(), 32, fit="crop", out_range=(0, 1))
    assert out.shape == (1, 3, 32, 32) and out[..., 2:-2].min() > 0.95


def test_pad_is_the_default_and_loses_nothing():
    out, geo = prepare_images(_band_image(), 32, out_range=(0, 1), return_geometry=True)
    g = geo[0]
    assert out.shape == (1, 3, 32, 32) and g.fit == "pad" and g.resized == (16, 32) and (g.top, g.left) == (8, 0)
    assert torch.allclose(out[..., :8, :], torch.full((1, 3, 8, 32), 0.5))       # mid-gray padding above
    assert torch.allclose(out[..., 24:, :], torch.full((1, 3, 8, 32), 0.5))      # and below
    assert out[0, 0, 10:22, 0].min() > 0.9 and out[0, 1, 10:22, 0].max() < 0.1   # the red strip is still there
    assert out[0, :, 10:22, 10:22].min() > 0.95                                  # the centre band too
    assert g.valid_box() == (8, 24, 0, 32)
    assert geometry_of(_band_image(), 32) == geo


def test_resize_stretches():
    out, geo = prepare_images(_band_image(), 32, fit="resize", out_range=(0, 1), return_geometry=True)
    assert geo[0].resized == (32, 32) and (geo[0].top, geo[0].left) == (0, 0)
    assert out[0, :, :, 10:22].min() > 0.95 and out[0, 1:, :, 3:6].max() < 0.1  # band stretched to 8..24


def _blob_labels(h, w, seed=0):
    """Big regions drawn at input size: background 0, an ellipse 1, a rectangle 2, a right-side band 3."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int64)
    lab[((yy - h * 0.5) / (h * 0.3)) ** 2 + ((xx - w * 0.35) / (w * 0.2)) ** 2 < 1] = 1
    lab[int(h * 0.1):int(h * 0.45), int(w * 0.6):int(w * 0.85)] = 2
    lab[:, int(w * 0.9):] = 3  # at the side a centre crop would cut off
    return lab


def _iou(a, b, k):
    a, b = torch.as_tensor(a) == k, torch.as_tensor(b) == k
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("fit", ["pad", "resize"])
@pytest.mark.parametrize("hw, size", [((48, 80), 32), ((80, 48), 32), ((48, 80), 64)])
def test_labels_round_trip_through_the_geometry(fit, hw, size):
    lab = _blob_labels(*hw)
    _, geo = prepare_images(np.zeros((*hw, 3), np.uint8), size, fit=fit, return_geometry=True)
    model_grid = prepare_labels(lab[None], geo)                         # (1, size, size), padding = 255
    assert model_grid.shape == (1, size, size) and model_grid.dtype == torch.int64
    if fit == "pad":
        y0, y1, x0, x1 = geo[0].valid_box()
        assert (model_grid[0, :y0] == 255).all() and (model_grid[0, y1:] == 255).all()
        assert (model_grid[0, :, :x0] == 255).all() and (model_grid[0, :, x1:] == 255).all()
        assert (model_grid[0, y0:y1, x0:x1] != 255).all()
    back = restore_labels(model_grid, geo)                              # nearest
    assert back.shape == (1, *hw) and back.dtype == torch.int64
    # two nearest resamplings at 0.4-0.8x move each boundary by up to a pixel or two: small
    # regions (300-700 px here) keep IoU 0.80-0.98 (measured); a misplaced geometry drops far lower
    assert (back[0] == torch.as_tensor(lab)).float().mean() > 0.94
    for k in range(4):
        assert _iou(back[0], lab, k) > 0.78, k
    # scores: one-hot at the model grid, restored bilinearly, argmax at the input size
    scores = torch.nn.functional.one_hot(model_grid.clamp_max(3), 4).permute(0, 3, 1, 2).float()
    back_s = restore_labels(scores, geo)
    assert back_s.shape == (1, 4, *hw) and back_s.dtype == torch.float32
    for k in range(4):
        assert _iou(back_s[0].argmax(0), lab, k) > 0.78, k


def test_big_regions_round_trip_at_iou_095():
    lab = _blob_labels(96, 160)  # regions of 1400-9600 px (measured IoU 0.97-1.00)
    geo = geometry_of(np.zeros((96, 160, 3), np.uint8), 128)
    back = restore_labels(prepare_labels(lab[None], geo), geo)[0]
    assert min(_iou(back, lab, k) for k in range(4)) > 0.95
    assert (back == torch.as_tensor(lab)).float().mean() > 0.98


def test_restore_from_a_coarser_model_grid():
    """Outputs at the latent / attention grid (size / 8) map back just as well, for big regions."""
    lab = _blob_labels(96, 160)
    geo = geometry_of(np.zeros((96, 160, 3), np.uint8), 128)
    coarse = prepare_labels(lab[None], geo, size=32)
    back = restore_labels(coarse, geo)
    assert back.shape == (1, 96, 160)
    assert min(_iou(back[0], lab, k) for k in range(4)) > 0.8


def test_crop_restores_to_the_input_size_with_the_unseen_sides_filled():
    lab = _blob_labels(48, 80)
    _, geo = prepare_images(np.zeros((48, 80, 3), np.uint8), 32, fit="crop", return_geometry=True)
    g = geo[0]
    assert g.resized == (32, 53) and (g.top, g.left) == (0, -10)
    back = restore_labels(prepare_labels(lab[None], geo), geo)[0]
    assert back.shape == (48, 80)
    # the model saw input columns 15..62 (the resized 10..41): outside them the ignore label
    assert (back[:, :15] == 255).all() and (back[:, 63:] == 255).all()
    seen = back[:, 15:63]
    assert (seen != 255).all() and (seen == torch.as_tensor(lab)[:, 15:63]).float().mean() > 0.94
    assert (lab == 3).sum() > 0 and not (back == 3).any()  # the right-side band was cropped away
    s = restore_labels(torch.ones(1, 2, 32, 32), geo, fill=-1.0)
    assert (s[0, :, :, :15] == -1).all() and torch.allclose(s[0, :, :, 15:63], torch.ones(1)) and (s[0, :, :, 63:] == -1).all()


def test_batch_of_different_sizes_restores_each_to_its_own_size():
    imgs = [np.zeros((48, 80, 3), np.uint8), Image.new("RGB", (48, 80)), torch.zeros(3, 64, 64)]
    x, geo = prepare_images(imgs, 32, return_geometry=True)
    assert x.shape == (3, 3, 32, 32) and len(geo) == 3 and not geo.uniform
    labs = [_blob_labels(48, 80), _blob_labels(80, 48), _blob_labels(64, 64)]
    model_grid = prepare_labels(labs, geo)
    back = restore_labels(model_grid, geo)
    assert isinstance(back, list) and [tuple(b.shape) for b in back] == [(48, 80), (80, 48), (64, 64)]
    for b, lab in zip(back, labs):
        assert min(_iou(b, lab, k) for k in range(4)) > 0.85
    scores = restore_labels(torch.rand(3, 5, 8, 8), geo)
    assert [tuple(s.shape) for s in scores] == [(5, 48, 80), (5, 80, 48), (5, 64, 64)]
    sub = restore_labels(model_grid[:2], geo[:2])                # sub-batches slice the geometry
    assert isinstance(geo[:2], Geometry) and [tuple(b.shape) for b in sub] == [(48, 80), (80, 48)]
    same = restore_labels(torch.zeros(2, 32, 32, dtype=torch.long), geometry_of([np.zeros((48, 80))] * 2, 32))
    assert isinstance(same, torch.Tensor) and same.shape == (2, 48, 80)


def test_restore_and_prepare_labels_reject_mismatches():
    geo = geometry_of(np.zeros((48, 80, 3), np.uint8), 32)
    with pytest.raises(ValueError, match="2 maps for a geometry of 1"):
        restore_labels(torch.zeros(2, 32, 32, dtype=torch.long), geo)
    with pytest.raises(ValueError, match="mode='nearest'"):
        restore_labels(torch.zeros(1, 32, 32, dtype=torch.long), geo, mode="bilinear")
    with pytest.raises(TypeError, match="Geometry"):
        restore_labels(torch.zeros(1, 32, 32, dtype=torch.long), [(48, 80)])
    with pytest.raises(ValueError, match="drawn at their image's own size"):
        prepare_labels(np.zeros((1, 32, 32), np.int64), geo)
    with pytest.raises(TypeError, match="integer dtype"):
        prepare_labels(np.full((1, 48, 80), 1.5), geo)


def _photo():
    """scikit-image's astronaut (512x512) and coffee (400x600) when installed, else a synthetic
    400x600 photo-like image (smooth gradients plus a few shapes)."""
    try:
        from skimage import data
        return data.coffee(), "coffee"
    except ImportError:
        yy, xx = np.mgrid[:400, :600] / 400.0
        img = np.stack([0.5 + 0.4 * np.sin(3 * xx), 0.5 + 0.4 * np.cos(2 * yy + xx), 0.3 + 0.5 * yy], -1)
        img[((yy - 0.5) ** 2 + (xx - 0.3) ** 2) < 0.04] = (0.9, 0.2, 0.1)
        img[50:150, 500:590] = (0.1, 0.1, 0.8)  # at the side a centre crop would cut off
        return (img * 255).astype(np.uint8), "synthetic"


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_non_square_photo_round_trip(fit):
    photo, _ = _photo()
    h, w = photo.shape[:2]
    assert h != w
    x, geo = prepare_images(photo, 128, fit=fit, out_range=(0, 1), return_geometry=True)
    back = restore_labels(x, geo)  # the prepared image itself, as (1, 3, 128, 128) "scores"
    assert back.shape == (1, 3, h, w)
    ref = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    err = (back[0] - ref).abs().mean(0)
    if fit == "pad":
        assert err.mean() < 0.05  # every pixel is there, only blurred by the 128-px round trip
    else:
        assert err[:, :50].mean() > 0.2 and err[:, w // 4:3 * w // 4].mean() < 0.05  # sides lost, centre kept


def test_backbone_preprocess(sd_tiny):
    x = sd_tiny.preprocess(Image.new("RGBA", (100, 80)))
    assert x.shape == (1, 3, 64, 64) and x.dtype == sd_tiny.dtype
    x, geo = sd_tiny.preprocess(Image.new("RGB", (100, 80)), return_geometry=True)
    assert x.shape == (1, 3, 64, 64) and geo[0].image_size == (80, 100) and geo[0].resized == (51, 64)


def test_method_outputs_come_back_at_the_input_size(sd_tiny):
    """The call-site pattern on a non-square image (random weights: numbers meaningless): a method
    prepares the images itself, ``geometry_of`` records the same placement, ``restore_labels`` maps its
    model-grid output back; labels drawn on the image reach the features' grid via ``prepare_labels``."""
    from diffseg_utils.emerdiff import emerdiff_segment
    from diffseg_utils.features import extract_features
    from diffseg_utils.probes import probe_features

    img = (np.random.default_rng(0).uniform(size=(48, 80, 3)) * 255).astype(np.uint8)
    geo = geometry_of(img, sd_tiny.resolution)
    assert sd_tiny.preprocess(img, return_geometry=True)[1] == geo
    res = emerdiff_segment(sd_tiny, img, num_segments=2, num_steps=4, progress=False)
    labels = restore_labels(res.pixels, geo)
    assert labels.shape == (1, 48, 80) and labels.dtype == res.pixels.dtype
    assert restore_labels(res.low_res, geo).shape == (1, 48, 80)      # the low-res segments too
    assert restore_labels(res.diffs, geo).shape == (1, 2, 48, 80)     # and the per-segment scores
    block = next(b for b in sd_tiny.blocks() if b.startswith("up_blocks"))
    imgs = [img, img[:, ::-1].copy()]
    fm = extract_features(sd_tiny, imgs, [block], [10], progress=False)
    lab = prepare_labels([_blob_labels(48, 80)] * 2, geometry_of(imgs, sd_tiny.resolution), size=fm.image_size)
    assert lab.shape == (2, *fm.image_size) and (lab == 255).any()   # the padding is ignored
    assert 0.0 <= probe_features(fm, lab, fm, lab, 4) <= 1.0
