"""The floors: colour, and colour + position as random Fourier features."""
import pytest
import torch

import diffseg_utils as ds
from diffseg_utils.baselines import POSITION_FEATURES, position_features


def test_position_features_shape_range_and_determinism():
    p = position_features(6, 10, seed=3)
    assert p.shape == (POSITION_FEATURES, 6, 10) and p.dtype == torch.float32
    assert p.abs().max() <= 1 + 1e-6
    assert torch.equal(p, position_features(6, 10, seed=3))
    assert not torch.equal(p, position_features(6, 10, seed=4))
    c, s = p[: POSITION_FEATURES // 2], p[POSITION_FEATURES // 2:]
    torch.testing.assert_close(c ** 2 + s ** 2, torch.ones_like(c))  # cosine / sine pairs of one phase
    assert position_features(4, 4, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("num", [0, 3])
def test_position_features_rejects_odd_counts(num):
    with pytest.raises(ValueError, match="even"):
        position_features(4, 4, num=num)


def test_rgbxy_keeps_dtype_and_checks_input():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float16)
    f = ds.rgbxy_features(x)
    m = f.maps[(0, "rgbxy")]
    assert m.shape == (2, 3 + POSITION_FEATURES, 8, 8) and m.dtype == torch.float16
    assert torch.equal(m[:, :3], x) and torch.equal(m[0, 3:], m[1, 3:])
    with pytest.raises(TypeError, match="255"):
        ds.rgbxy_features(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rgb"):
        ds.baseline_features(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), kind="xy")


def test_position_floor_draws_a_region_a_line_cannot():
    """A centred disc is the same in every image (the prior of aligned faces): colour says nothing,
    position features let a linear probe draw it; raw (x, y) could only split the image by a line."""
    n, h = 4, 32
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 8 ** 2).long()
    labels = disc[None].expand(n, h, h).clone()
    images = torch.rand(n, h, h, 3, generator=torch.Generator().manual_seed(0)).mul(255).to(torch.uint8)
    kw = dict(num_classes=2, per_class=300, seed=0)
    xy = ds.probe_features(ds.baseline_features(images, "rgbxy"), labels, ds.baseline_features(images, "rgbxy"),
                           labels, **kw)
    rgb = ds.probe_features(ds.baseline_features(images, "rgb"), labels, ds.baseline_features(images, "rgb"),
                            labels, **kw)
    assert xy > 0.8 and rgb < 0.6, (xy, rgb)


def test_floor_features_one_call_matches_the_parts(ddpm_tiny):
    """Every floor, for each image set, equals computing it by hand: colour, colour + position, and the untrained
    denoiser's features read as the trained backbone's are."""
    g = torch.Generator().manual_seed(0)
    sets = [torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8).numpy() for n in (2, 3)]  # as Dataset.images
    blocks = ds.decoder_blocks(ddpm_tiny)[:2]
    floors = ds.floor_features(ddpm_tiny, sets, blocks=blocks, timesteps=[0, 50], seed=1, batch_size=2)
    assert tuple(floors) == ds.FLOORS and all(len(v) == 2 for v in floors.values())
    for i, x in enumerate(sets):
        assert torch.equal(floors["raw RGB"][i].maps[(0, "rgb")], ds.baseline_features(x, "rgb").maps[(0, "rgb")])
        assert torch.equal(floors["raw RGB + position"][i].maps[(0, "rgbxy")],
                           ds.baseline_features(x, "rgbxy").maps[(0, "rgbxy")])
        ref = ds.extract_features(ds.untrained_like(ddpm_tiny, seed=1), x, blocks, [0, 50], seed=1, batch_size=2)
        got = floors["untrained denoiser"][i]
        assert got.maps.keys() == ref.maps.keys()
        for k in ref.maps:
            assert torch.equal(got.maps[k], ref.maps[k])
    with pytest.raises(ValueError, match="empty"):
        ds.floor_features(ddpm_tiny, [], blocks=blocks, timesteps=[0])
