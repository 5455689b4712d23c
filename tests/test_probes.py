import numpy as np
import torch

from diffseg_utils.features import FeatureMaps
from diffseg_utils.probes import RidgeProbe, mlp_probe, probe_features, probe_grid


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
    table = probe_grid(None, None, ytr, None, yte, ["sig", "noise"], [10, 50], num_classes=3, progress=False,
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
