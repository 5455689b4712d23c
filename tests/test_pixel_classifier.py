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


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "foreach-adam"])
def test_batched_members_equal_sequential_members(fused, monkeypatch):
    import diffseg_utils.pixel_classifier as pc

    monkeypatch.setitem(pc._FUSED_ADAM, "cpu", fused and hasattr(torch, "_fused_adam_"))
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
    ens.save(tmp_path / "e.pt")
    again = PixelEnsemble.load(tmp_path / "e.pt")
    a, b = ens.predict(fm), again.predict(fm)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert a[0].shape == (3, 8, 8) and a[2].shape == (3,)
