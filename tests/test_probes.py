from dataclasses import replace

import numpy as np
import pytest
import torch

from diffseg_utils.features import FeatureMaps
from diffseg_utils.probes import RidgeProbe, mlp_probe, mlp_probe_predict, probe_features, probe_grid


def _maps(seed, n=6, size=16):
    """Two blocks at two timesteps: block "sig" carries the 3-class label map (plus noise), "noise" does not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, 4:12, 2:8] = 1
    labels[:, 2:14, 9:14] = 2
    labels = torch.stack([torch.roll(lab, int(s), 1) for lab, s in zip(labels, torch.randint(-3, 4, (n,), generator=g))])
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    maps = {}
    for t in (10, 50):
        mix = torch.randn(3, 5, generator=torch.Generator().manual_seed(t))  # the same "semantics" in train and test
        maps[(t, "sig")] = torch.einsum("nkhw,kc->nchw", onehot, mix) + 0.3 * torch.randn(n, 5, size, size, generator=g)
        maps[(t, "noise")] = torch.randn(n, 5, size, size, generator=g)
    return FeatureMaps(maps, (size, size)), labels


def test_probes_read_labels_from_informative_features_only():
    tr, ytr = _maps(0)
    te, yte = _maps(1)
    sig, noise = tr.select(["sig"], [10]), tr.select(["noise"], [10])
    assert probe_features(sig, ytr, te.select(["sig"], [10]), yte, 3) > 0.9
    assert probe_features(noise, ytr, te.select(["noise"], [10]), yte, 3) < 0.5
    assert mlp_probe(sig, ytr, te.select(["sig"], [10]), yte, 3) > 0.9
    assert mlp_probe(noise, ytr, te.select(["noise"], [10]), yte, 3) < 0.5
    table = probe_grid(train_labels=ytr, test_labels=yte, blocks=["sig", "noise"], timesteps=[10, 50], num_classes=3, progress=False,
                       train_features=tr, test_features=te)
    assert table.best()[0] == "sig" and np.all(table.miou[0] > table.miou[1])


def test_ridge_probe_matches_normal_equations():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=g), torch.randint(0, 3, (200,), generator=g)
    p = RidgeProbe.fit(x, y, 3, ridge=0.1)
    xs = torch.cat([(x.double() - x.double().mean(0)) / x.double().std(0), torch.ones(200, 1, dtype=torch.double)], 1)
    w = torch.linalg.lstsq(torch.cat([xs, (0.1 * 200) ** 0.5 * torch.eye(5, dtype=torch.double)]),
                           torch.cat([torch.nn.functional.one_hot(y, 3).double(), torch.zeros(5, 3, dtype=torch.double)])).solution
    torch.testing.assert_close(p.weight, w.float(), atol=1e-5, rtol=1e-4)


def _upsample_labels(labels, factor):
    return labels.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


def test_probes_work_when_labels_and_features_differ_in_resolution():
    """64-px labels on features of 512-px images (SD on a toy dataset), and the other way round.
    Before: probe_grid raised, probe_features silently read the wrong pixels, mlp_probe raised."""
    tr, ytr = _maps(0)
    te, yte = _maps(1)
    big_tr, big_te = replace(tr, image_size=(512, 512)), replace(te, image_size=(512, 512))
    ytr64, yte64 = _upsample_labels(ytr, 4), _upsample_labels(yte, 4)  # the same pictures at 64 px
    same = probe_features(tr.select(["sig"], [10]), ytr64, te.select(["sig"], [10]), yte64, 3)
    big = probe_features(big_tr.select(["sig"], [10]), ytr64, big_te.select(["sig"], [10]), yte64, 3)
    assert same > 0.85 and big == pytest.approx(same, abs=1e-6)  # only the features' nominal size differs
    table = probe_grid(train_labels=ytr64, test_labels=yte64, train_features=big_tr, test_features=big_te,
                       num_classes=3, progress=False)
    assert table.best()[0] == "sig" and np.all(table.miou[0] > 0.85) and np.all(table.miou[1] < 0.5)
    assert mlp_probe(big_tr.select(["sig"], [10]), ytr64, big_te.select(["sig"], [10]), yte64, 3) > 0.85
    # labels finer than the features' image grid
    ytr256, yte256 = _upsample_labels(ytr, 16), _upsample_labels(yte, 16)
    assert probe_features(tr.select(["sig"], [10]), ytr256, te.select(["sig"], [10]), yte256, 3) > 0.85
    pred = mlp_probe_predict(tr.select(["sig"], [10]), ytr64, te.select(["sig"], [10]), 3)
    assert pred.shape == (6, 64, 64)


def test_labels_of_another_aspect_ratio_are_refused_with_the_fix():
    tr, ytr = _maps(0)
    with pytest.raises(ValueError, match="prepare_labels"):
        probe_features(tr, ytr[:, :, :8], tr, ytr[:, :, :8], 3)
    with pytest.raises(TypeError, match="integer class ids"):
        probe_features(tr, ytr.float() + 0.5, tr, ytr, 3)


def test_probe_grid_needs_no_backbone_given_features():
    tr, ytr = _maps(0)
    te, yte = _maps(1)
    table = probe_grid(train_labels=ytr, test_labels=yte, train_features=tr, test_features=te, progress=False)
    assert table.blocks == ["sig", "noise"] and table.timesteps == [10, 50] and table.miou.shape == (2, 2)
    only = probe_grid(train_labels=ytr, test_labels=yte, blocks=["noise"], timesteps=[50], train_features=tr, test_features=te,
                      progress=False)
    assert only.blocks == ["noise"] and only.timesteps == [50]
    assert only.miou[0, 0] == pytest.approx(table.miou[1, 1])
    with pytest.raises(ValueError, match="no train features"):
        probe_grid(train_labels=ytr, test_labels=yte, test_features=te)
    with pytest.raises(ValueError, match="need the backbone"):
        probe_grid(train_labels=ytr, test_labels=yte, train_features=tr, test_features=te, blocks=[5])


def _ridge_reference(x, y, k, ridge):
    """The normal equations in float64 numpy on the CPU, with the bias column included."""
    x = x.numpy().astype(np.float64)
    n = len(x)
    xs = np.concatenate([(x - x.mean(0)) / np.maximum(x.std(0, ddof=1), 1e-6), np.ones((n, 1))], 1)
    w = np.linalg.solve(xs.T @ xs + ridge * n * np.eye(xs.shape[1]), xs.T @ np.eye(k)[y.numpy()])
    return w, xs @ w


def _correlated(n=4000, c=96, k=5, seed=0):
    """Features like UNet activations: a low-rank class signal, noise, and large per-channel offsets."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(k, 8, generator=g)[y] + 0.5 * torch.randn(n, 8, generator=g)
    x = z @ torch.randn(8, c, generator=g) * 3 + 0.3 * torch.randn(n, c, generator=g)
    return x + 20 * torch.randn(c, generator=g), y


def test_ridge_probe_float32_matches_a_float64_reference():
    """Tolerances: weights 1e-3 of their largest magnitude (measured 8e-5; 2-3e-4 at 20000 x 512-1280),
    scores 1e-4 (measured 8e-6), and identical predictions."""
    x, y = _correlated()
    x[:, 3] = 7.25  # a constant channel: weight 0, no NaN
    p = RidgeProbe.fit(x, y, 5, ridge=1e-2)
    assert p.weight.dtype == torch.float32 and p.mean.dtype == torch.float32 and torch.isfinite(p.weight).all()
    w, s64 = _ridge_reference(x, y, 5, 1e-2)
    assert np.abs(p.weight.numpy() - w).max() < 1e-3 * np.abs(w).max()
    assert np.abs(p.scores(x).numpy() - s64).max() < 1e-4 * np.abs(s64).max()
    assert (p.predict(x).numpy() == s64.argmax(1)).all()
    assert (p.weight[3] == 0).all()


def test_ridge_probe_never_makes_float64():
    from torch.overrides import TorchFunctionMode

    class NoDouble(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                assert not (isinstance(o, torch.Tensor) and o.dtype == torch.float64), f"float64 from {func}"
            return out

    x, y = _correlated(n=500, c=16)
    with NoDouble():
        p = RidgeProbe.fit(x, y, 5)
        p.predict(x)
    with pytest.raises(ValueError, match="ridge must be"):
        RidgeProbe.fit(x, y, 5, ridge=0.0)


def test_ridge_probe_in_bfloat16_is_close_to_float32():
    """bfloat16 features are upcast to float32 (8 mantissa bits of input precision are what is lost)."""
    x, y = _correlated()
    p32, p16 = RidgeProbe.fit(x, y, 5), RidgeProbe.fit(x.bfloat16(), y, 5)
    assert p16.weight.dtype == torch.float32
    assert (p16.predict(x.bfloat16()) == p32.predict(x)).float().mean() > 0.99
    # weights: measured within 3.4% of their largest magnitude (bf16 rounds each input to 0.4%)
    torch.testing.assert_close(p16.weight, p32.weight, atol=0.06 * float(p32.weight.abs().max()), rtol=0)
    tr, ytr = _maps(0)
    te, yte = _maps(1)
    as_bf16 = lambda f: replace(f, maps={k: v.bfloat16() for k, v in f.maps.items()})  # noqa: E731
    m32 = probe_features(tr, ytr, te, yte, 3)
    m16 = probe_features(as_bf16(tr), ytr, as_bf16(te), yte, 3)
    assert abs(m32 - m16) < 0.01
