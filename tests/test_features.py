import pytest
import torch
import torch.nn.functional as F

from diffseg_utils.features import FeatureMaps, extract_features, make_noise
from diffseg_utils.hooks import CaptureOutputs


@pytest.mark.parametrize("hw, size", [((4, 4), (32, 32)), ((7, 5), (20, 33)), ((16, 16), (16, 16)), ((1, 1), (8, 8))])
def test_lazy_sample_equals_dense_upsample(hw, size):
    g = torch.Generator().manual_seed(0)
    maps = {(50, "a"): torch.randn(3, 5, *hw, generator=g), (50, "b"): torch.randn(3, 2, hw[0] * 2, hw[1] * 2, generator=g),
            (150, "a"): torch.randn(3, 5, *hw, generator=g), (150, "b"): torch.randn(3, 2, hw[0] * 2, hw[1] * 2, generator=g)}
    fm = FeatureMaps(maps, size)
    dense = torch.cat([F.interpolate(maps[k], size=size, mode="bilinear") for k in
                       [(50, "a"), (50, "b"), (150, "a"), (150, "b")]], 1)  # DDPM-Seg's call, t outer
    torch.testing.assert_close(fm.dense(), dense)
    img = torch.randint(0, 3, (500,), generator=g)
    y = torch.randint(0, size[0], (500,), generator=g)
    x = torch.randint(0, size[1], (500,), generator=g)
    torch.testing.assert_close(fm.sample(img, y, x), dense[img, :, y, x], atol=1e-5, rtol=1e-5)


def test_noise_modes(sd_tiny):
    shared = make_noise(sd_tiny, 3, "shared", seed=1)
    assert torch.equal(shared[0], shared[2])
    per = make_noise(sd_tiny, 3, "per_image", seed=1)
    assert not torch.equal(per[0], per[1])
    torch.testing.assert_close(make_noise(sd_tiny, 2, "per_image", seed=1, offset=1), per[1:])
    with pytest.raises(ValueError, match="shape"):
        make_noise(sd_tiny, 2, torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("which", ["sd_tiny", "ddpm_tiny"])
def test_extract_matches_direct_forward_and_leaves_unet_unchanged(which, request):
    bb = request.getfixturevalue(which)
    imgs = torch.rand(3, 3, bb.resolution, bb.resolution)
    names = [n for n in bb.blocks() if n.startswith("up_blocks")][:3]
    x = bb.preprocess(imgs)
    z0 = bb.encode(x)
    before = bb.predict(z0, 100)
    fm = extract_features(bb, imgs, names, [10, 100], batch_size=2, dtype=torch.float32, progress=False)
    assert fm.keys == [(10, n) for n in names] + [(100, n) for n in names]
    assert fm.maps[(10, names[0])].shape[0] == 3
    # reference: one image, one t, separate call
    eps = make_noise(bb, 1, "shared", seed=0)
    with CaptureOutputs(bb.denoiser, names) as cap:
        bb.predict(bb.add_noise(z0[2:3], 100, eps), 100)
    for nme in names:
        torch.testing.assert_close(fm.maps[(100, nme)][2:3], cap.outputs[nme], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bb.predict(z0, 100), before)
    assert all(not bb.denoiser.get_submodule(n)._forward_hooks for n in names)


def test_hooks_removed_after_exception(sd_tiny):
    name = "up_blocks.1"
    with pytest.raises(RuntimeError, match="boom"):
        with CaptureOutputs(sd_tiny.denoiser, [name]):
            raise RuntimeError("boom")
    assert not sd_tiny.denoiser.get_submodule(name)._forward_hooks
    # and when the forward itself fails inside extract_features
    with pytest.raises(Exception):
        extract_features(sd_tiny, torch.rand(1, 3, 64, 64), [name], [10], prompt=["a", "b"], progress=False)
    assert not sd_tiny.denoiser.get_submodule(name)._forward_hooks


def test_clear_errors(sd_tiny):
    with pytest.raises(ValueError, match="unknown block 'up_blocks.9'.*up_blocks.1"):
        extract_features(sd_tiny, torch.rand(1, 3, 64, 64), ["up_blocks.9"], [10], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        extract_features(sd_tiny, torch.rand(1, 3, 64, 64), ["up_blocks.1"], [1000], progress=False)


def test_adm_indices_and_num_noise(ddpm_tiny):
    fm = extract_features(ddpm_tiny, torch.rand(2, 3, 64, 64), [5, 6], [50], num_noise=2, progress=False)
    assert fm.blocks == ["up_blocks.1.upsamplers.0", "up_blocks.2.resnets.0"]
    one = extract_features(ddpm_tiny, torch.rand(2, 3, 64, 64), [5], [50], progress=False)
    assert fm.maps[(50, fm.blocks[0])].dtype == torch.float16 and one.channels == 32
