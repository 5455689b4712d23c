import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffseg_utils.features import FeatureMaps
from diffseg_utils.pixel_classifier import (EnsembleConfig, PixelEnsemble, image_uncertainty, member_init,
                                            member_order, vote_and_uncertainty)


def _toy_features(n=3, size=8, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = {(0, "a"): torch.randn(n, c, size // 2, size // 2, generator=g), (0, "b"): torch.randn(n, 2, size, size, generator=g)}
    fm = FeatureMaps(maps, (size, size))
    dense = fm.dense()
    labels = (dense[:, 0] > 0).long() + (dense[:, 1] > 0.5).long()  # learnable, 3 classes
    return fm, labels


def _reference_member(fm, labels, cfg, seed):
    """DDPM-Seg's way: one nn.Sequential member, torch.optim.Adam, its own loop and early stop."""
    h1, h2 = cfg.widths()
    d = fm.channels
    net = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.BatchNorm1d(h1), nn.Linear(h1, h2), nn.ReLU(),
                        nn.BatchNorm1d(h2), nn.Linear(h2, cfg.num_classes))
    w = member_init(d, cfg, seed)
    with torch.no_grad():
        for lin, wi in zip([net[0], net[3], net[6]], w):
            lin.weight.copy_(wi.T)
            lin.bias.zero_()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    X = fm.dense().permute(0, 2, 3, 1).reshape(-1, d)  # all pixels, as DDPM-Seg materialises them
    y = labels.reshape(-1)
    best, strikes = float("inf"), 0
    for epoch in range(cfg.max_epochs):
        order = member_order(len(y), seed, epoch)
        stop = False
        for s in range(0, len(y), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = F.cross_entropy(net(X[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            if epoch > cfg.min_epochs - 1:
                if loss.item() < best:
                    best, strikes = loss.item(), 0
                else:
                    strikes += 1
                if strikes > cfg.patience:
                    stop = True
                    break
        if stop:
            break
    return net


def _close_but_for_adam_noise(got, want):
    """Equal to float rounding, except that Adam divides a near-zero gradient by its own tiny RMS, so a
    rounding-level gradient difference can become a full +-lr step on a few weights (seen: 6 of 1024)."""
    diff = (got - want).abs()
    assert float(diff.max()) < 5e-3, f"max difference {float(diff.max()):.2e}"
    assert float((diff > 2e-5 + 1e-4 * want.abs()).float().mean()) <= 0.01


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "plain-adam"])
def test_batched_members_equal_sequential_members(fused, monkeypatch):
    import diffseg_utils.pixel_classifier as pc

    monkeypatch.setitem(pc._FUSED_ADAM, "cpu", fused and pc._fused_adam_works(torch.device("cpu")))
    fm, labels = _toy_features()
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=32, max_epochs=8, min_epochs=2, patience=3, seed=5)
    ens = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    assert any(h["active"] < 3 for h in ens.history), "early stopping should have fired for some member"
    for e in range(3):
        ref = _reference_member(fm, labels, cfg, cfg.seed + e)
        for i, lin in enumerate([ref[0], ref[3], ref[6]]):
            _close_but_for_adam_noise(ens.weights[i][e], lin.weight.detach().T)
            _close_but_for_adam_noise(ens.biases[i][e, 0], lin.bias.detach())
        for i, bn in enumerate([ref[2], ref[5]]):
            _close_but_for_adam_noise(ens.running_mean[i][e, 0], bn.running_mean)
            _close_but_for_adam_noise(ens.running_var[i][e, 0], bn.running_var)
        ref.eval()
        torch.testing.assert_close(ens.logits(fm.dense().permute(0, 2, 3, 1).reshape(-1, fm.channels))[e],
                                   ref(fm.dense().permute(0, 2, 3, 1).reshape(-1, fm.channels)), atol=1e-4, rtol=1e-4)


def test_hand_written_backward_equals_autograd():
    """train_step's gradients and BatchNorm updates equal autograd through the same batched network."""
    cfg = EnsembleConfig(num_classes=5, num_members=4, hidden=(12, 7), seed=1)
    ens = PixelEnsemble(cfg, 9)
    g = torch.Generator().manual_seed(0)
    for p in ens.params():  # move off the trivial init so every term of the backward matters
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x, y = torch.randn(4, 13, 9, generator=g), torch.randint(0, 5, (4, 13), generator=g)
    active = torch.tensor([True, False, True, True])
    loss, grads = ens.train_step(x, y, active)

    params = [p.clone().requires_grad_(True) for p in ens.params()]
    W, b, gam, bet = params[0:3], params[3:6], params[6:8], params[8:10]
    h, stats = x, []
    for i in range(2):
        a = torch.relu(x @ W[0] + b[0]) if i == 0 else torch.relu(h @ W[1] + b[1])
        var, mean = torch.var_mean(a, 1, unbiased=False, keepdim=True)
        stats.append((mean, var))
        h = (a - mean) / torch.sqrt(var + cfg.bn_eps) * gam[i] + bet[i]
    out = h @ W[2] + b[2]
    ref_loss = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none").reshape(4, -1).mean(1)
    ref_grads = torch.autograd.grad(ref_loss.sum(), params)
    torch.testing.assert_close(loss, ref_loss.detach())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for i, (mean, var) in enumerate(stats):  # running stats: momentum 0.1, unbiased var, inactive member untouched
        m = 0.1 * active.view(-1, 1, 1)
        torch.testing.assert_close(ens.running_mean[i], (m * mean).detach())
        torch.testing.assert_close(ens.running_var[i], (1 - m + m * var * 13 / 12).detach())


def test_early_stopping_rule():
    fm, labels = _toy_features()
    cfg = EnsembleConfig(num_classes=3, num_members=2, batch_size=16, max_epochs=50, min_epochs=1, patience=0)
    ens = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    # patience 0: a member stops at the first batch after epoch 1 that does not beat its best loss
    assert ens.history[-1]["active"] == 0 and len(ens.history) < 50


@pytest.mark.parametrize("progress", [False, True])
def test_max_steps_caps_training_with_or_without_progress_bar(progress):
    fm, labels = _toy_features()  # 192 pixels = 12 batches of 16 per epoch
    cfg = EnsembleConfig(num_classes=3, num_members=2, batch_size=16, max_epochs=50, min_epochs=60, max_steps=5)
    ens = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=progress)
    assert len(ens.history) == 1  # stopped inside the first epoch, after 5 batches


def test_vote_and_uncertainty_on_hand_made_logits():
    big = 20.0
    logits = torch.full((3, 4, 3), -big)
    logits[0, 0, 1] = logits[1, 0, 1] = logits[2, 0, 1] = big          # unanimous -> 1, no uncertainty
    logits[0, 1, 2] = logits[1, 1, 2] = logits[2, 1, 0] = big          # 2 vs 1 -> 2
    logits[0, 2, 0] = logits[1, 2, 1] = logits[2, 2, 2] = big          # three-way tie -> smallest label 0
    logits[:, 3, :] = 0.0                                              # all uniform: high entropy, no disagreement
    label, unc = vote_and_uncertainty(logits)
    assert label.tolist() == [1, 2, 0, 0]
    assert unc[0] < 1e-6 and unc[3] < 1e-6
    assert abs(unc[2] - np.log(3)) < 1e-4 and abs(unc[1] - (np.log(3) - (2 / 3) * np.log(2) - (1 / 3) * np.log(1))) < 1e-2
    scores = image_uncertainty(torch.tensor([[[0.0] * 9 + [1.0]]]))
    assert torch.allclose(scores, torch.tensor([1.0]))


def test_fit_errors_and_save_load(tmp_path):
    fm, labels = _toy_features()
    cfg = EnsembleConfig(num_classes=3, num_members=2, max_epochs=1)
    ens = PixelEnsemble(cfg, fm.channels)
    with pytest.raises(ValueError, match="outside 0..2"):
        ens.fit(fm, labels + 1)
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(3, 8, 8\)"):
        ens.fit(fm, labels[:2])
    ens.fit(fm, labels, progress=False)
    ens.save(tmp_path / "e.safetensors")
    again = PixelEnsemble.load(tmp_path / "e.safetensors")
    a, b = ens.predict(fm), again.predict(fm)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert a[0].shape == (3, 8, 8) and a[2].shape == (3,)
    for k in ("weights", "biases", "bn_weight", "bn_bias", "running_mean", "running_var"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(ens, k), getattr(again, k)))
    assert again.cfg == ens.cfg and again.dim == ens.dim


# ---------------------------------------------------------------------------- safe loading
class _RunsCodeWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_save_writes_safetensors_and_legacy_weights_only_files_load(tmp_path):
    from safetensors import safe_open

    fm, labels = _toy_features()
    ens = PixelEnsemble(EnsembleConfig(num_classes=3, num_members=2, max_steps=3), fm.channels).fit(fm, labels, progress=False)
    ens.save(tmp_path / "e.safetensors")
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:  # a plain safetensors file, config in the header
        assert "weights.0" in set(f.keys()) and '"num_classes": 3' in f.metadata()["config"]
    torch.save(ens.state_dict(), tmp_path / "old.pt")  # the format before safetensors: tensors and containers only
    old = PixelEnsemble.load(tmp_path / "old.pt")
    assert torch.equal(old.predict(fm)[0], ens.predict(fm)[0])
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PixelEnsemble"):
        PixelEnsemble.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_refuses_a_file_whose_unpickling_runs_code(tmp_path, writer):
    import pickle

    fm, labels = _toy_features()
    ens = PixelEnsemble(EnsembleConfig(num_classes=3, num_members=2, max_steps=2), fm.channels).fit(fm, labels, progress=False)
    # the payload works: a plain unpickler runs it
    probe, probe_marker = tmp_path / "probe.pkl", tmp_path / "probe-ran"
    probe.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(probe_marker)))
    pickle.loads(probe.read_bytes())
    assert probe_marker.exists()

    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    state = ens.state_dict()
    state["config"] = {**state["config"], "seed": _RunsCodeWhenUnpickled(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(ValueError, match="refusing to load .*never runs code"):
        PixelEnsemble.load(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- bad labels
def test_labels_must_be_integer_class_ids_of_the_right_shape():
    fm, labels = _toy_features()  # 3 images 8x8, classes 0..2
    ens = PixelEnsemble(EnsembleConfig(num_classes=3, num_members=2, max_steps=2), fm.channels)
    with pytest.raises(ValueError, match=r"not whole numbers, e\.g\. \[0\.5"):
        ens.fit(fm, labels.float() + 0.5, progress=False)
    with pytest.raises(ValueError, match="not whole numbers"):
        ens.fit(fm, np.where(labels.numpy() == 0, np.nan, labels.numpy()), progress=False)
    with pytest.raises(TypeError, match="mask.long"):
        ens.fit(fm, labels > 0, progress=False)
    with pytest.raises(ValueError, match=r"labels \[-1\] are outside 0..2"):
        ens.fit(fm, labels - (labels == 0).long(), progress=False)
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(3, 8, 8\).*got \(3, 8, 7\)"):
        ens.fit(fm, labels[:, :, :7], progress=False)
    with pytest.raises(ValueError, match=r"got \(8, 8\)"):
        ens.fit(fm, labels[0], progress=False)
    with pytest.raises(ValueError, match="ragged"):
        ens.fit(fm, [labels[0].numpy(), labels[1].numpy(), labels[2, :7].numpy()], progress=False)
    # whole-number floats and any integer dtype are the same labels
    a = PixelEnsemble(EnsembleConfig(num_classes=3, num_members=2, max_steps=4), fm.channels).fit(fm, labels.float(), progress=False)
    b = PixelEnsemble(EnsembleConfig(num_classes=3, num_members=2, max_steps=4), fm.channels).fit(fm, labels.numpy().astype(np.uint8), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.params(), b.params()))


# ---------------------------------------------------------------------------- device, dtype, host syncs
def test_ensemble_follows_the_features_device_unless_pinned():
    fm, labels = _toy_features()
    cfg = EnsembleConfig(num_classes=3, num_members=2, max_steps=2)
    ens = PixelEnsemble(cfg, fm.channels)
    assert not ens._pinned
    ens.fit(fm, labels, progress=False)
    assert ens.device == fm.device and not ens._pinned
    assert PixelEnsemble(cfg, fm.channels, device="cpu")._pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_train_on_cuda_without_syncs_in_the_loop():
    fm, labels = _toy_features()
    fm = FeatureMaps({k: v.cuda().half() for k, v in fm.maps.items()}, fm.image_size)
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=16, max_epochs=3, min_epochs=4)
    ens = PixelEnsemble(cfg, fm.channels)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        ens.fit(fm, labels, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ens.weights[0].is_cuda and ens.predict(fm)[0].is_cuda


def test_bfloat16_features_train_in_float32_and_match_float32_features():
    """bf16 maps are interpolated and upcast to float32 (the documented contract): the members stay
    float32, no float64 tensor is created, and the result is close to training on float32 maps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    fm32, labels = _toy_features(n=4, size=16, c=8)
    fm16 = FeatureMaps({k: v.bfloat16() for k, v in fm32.maps.items()}, fm32.image_size)
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=32, max_epochs=6, min_epochs=2, patience=5)
    seen = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    seen.add(o.dtype)
            return out

    with Dtypes():
        e16 = PixelEnsemble(cfg, fm16.channels).fit(fm16, labels, progress=False)
        lab16, unc16, score16 = e16.predict(fm16)
    assert torch.float64 not in seen
    assert all(p.dtype == torch.float32 for p in e16.params() + e16.running_mean + e16.running_var)
    assert unc16.dtype == torch.float32 and lab16.dtype == torch.long
    e32 = PixelEnsemble(cfg, fm32.channels).fit(fm32, labels, progress=False)
    lab32 = e32.predict(fm32)[0]
    assert (lab16 == lab32).float().mean() > 0.95
    assert (lab16 == labels).float().mean() > 0.8  # and it learned the task


def test_training_loop_does_not_synchronise_every_step(monkeypatch):
    """Count every way Python can pull a device value to the host during fit. Without early stopping
    nothing in the loop may (label checks and the per-epoch history only); with early stopping the
    strike counts are read back only when a member could have stopped, far fewer than the steps."""
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fm, labels = _toy_features()  # 192 pixels = 12 batches of 16 per epoch
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=16, max_epochs=6, min_epochs=7)
    ens = PixelEnsemble(cfg, fm.channels)
    calls.clear()
    ens.fit(fm, labels, progress=False)
    assert ens.steps_trained == 72 and len(calls) <= 4 + 2 * 6, calls
    calls.clear()
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=16, max_epochs=20, min_epochs=1, patience=20)
    ens = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    assert ens.steps_trained > 40 and len(calls) <= 4 + 2 * len(ens.history) + ens.steps_trained // 4, (len(calls), ens.steps_trained)


def test_fused_adam_probe_falls_back_when_the_api_changes(monkeypatch):
    """A torch whose functional Adam rejects the call (here: a changed signature) gets the plain update,
    decided once, with the same training result to float rounding."""
    import diffseg_utils.pixel_classifier as pc

    fm, labels = _toy_features()
    cfg = EnsembleConfig(num_classes=3, num_members=2, batch_size=32, max_epochs=3, min_epochs=4)
    monkeypatch.setitem(pc._FUSED_ADAM, "cpu", pc._fused_adam_works(torch.device("cpu")))
    fused = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    real = pc.torch_adam.adam

    def changed(*a, fused=None, **k):
        if fused:
            raise TypeError("adam() got an unexpected keyword argument 'beta1'")
        return real(*a, **k)
    monkeypatch.setattr(pc.torch_adam, "adam", changed)
    monkeypatch.delitem(pc._FUSED_ADAM, "cpu")
    plain = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    assert pc._FUSED_ADAM["cpu"] is False
    for a, b in zip(fused.params(), plain.params()):
        _close_but_for_adam_noise(b, a)


def test_pixel_table_and_per_batch_interpolation_train_identically():
    fm, labels = _toy_features()
    fm = FeatureMaps({k: v.half() for k, v in fm.maps.items()}, fm.image_size)
    cfg = EnsembleConfig(num_classes=3, num_members=3, batch_size=20, max_epochs=4, min_epochs=1, patience=2)
    a = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    b = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False, cache_bytes=0)
    assert a.member_steps == b.member_steps
    assert all(torch.equal(x, y) for x, y in zip(a.params() + a.running_var, b.params() + b.running_var))
