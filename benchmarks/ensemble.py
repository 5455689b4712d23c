"""The batched MLP ensemble vs DDPM-Seg's one-member-at-a-time training, and its memory.

Prints, in one run:
  1. wall time of fitting 10 members batched (PixelEnsemble) vs 10 members trained one after
     another (nn.Sequential + torch.optim.Adam over a materialised pixel matrix), same data,
     initial weights and number of steps, two ways: DDPM-Seg's released loop (DataLoader over
     a per-row dataset, batch accuracy every step) and a lean loop with that overhead trimmed;
     the ratios (goal >= 5x on CPU against the reference way);
  2. memory of training on 20 images at 256x256 with the google DDPM-256 topology's features
     (blocks {5,6,7,8,12} x t {50,150,250} = 4224 dims; random values and labels): our
     lazy store + measured training peak vs DDPM-Seg's dense fp32 pixel matrix, whose size is
     computed from the shapes (20 x 4224 x 256 x 256 x 4 bytes), never allocated.

    python benchmarks/ensemble.py [--epochs 2] [--dim 256]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffseg_utils.features import FeatureMaps
from diffseg_utils.pixel_classifier import EnsembleConfig, PixelEnsemble, member_init, member_order


class PixelRows(torch.utils.data.Dataset):
    """DDPM-Seg's FeatureDataset: one (feature row, label) pair per item."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _member(d: int, cfg: EnsembleConfig, seed: int):
    h1, h2 = cfg.widths()
    net = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.BatchNorm1d(h1), nn.Linear(h1, h2), nn.ReLU(),
                        nn.BatchNorm1d(h2), nn.Linear(h2, cfg.num_classes))
    with torch.no_grad():
        for lin, w in zip([net[0], net[3], net[6]], member_init(d, cfg, seed)):
            lin.weight.copy_(w.T); lin.bias.zero_()
    return net, torch.optim.Adam(net.parameters(), lr=cfg.lr)


def reference_fit(fm: FeatureMaps, labels: torch.Tensor, cfg: EnsembleConfig, loop: str) -> float:
    """Each member alone over a materialised pixel matrix; returns seconds.

    loop="ddpmseg": DDPM-Seg's train loop as released (a DataLoader over a per-row dataset with
    shuffle, the batch accuracy and loss.item() every step). loop="lean": the same arithmetic with
    the fat trimmed (direct indexing, nothing but the step), so the batching gain alone shows.
    """
    t0 = time.perf_counter()
    X = fm.dense().permute(0, 2, 3, 1).reshape(-1, fm.channels)
    y = labels.reshape(-1)
    for e in range(cfg.num_members):
        net, opt = _member(fm.channels, cfg, cfg.seed + e)
        net.train()
        if loop == "ddpmseg":
            loader = torch.utils.data.DataLoader(PixelRows(X, y), batch_size=cfg.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(cfg.seed + e))
            for epoch in range(cfg.max_epochs):
                for xb, yb in loader:
                    opt.zero_grad()
                    out = net(xb)
                    loss = F.cross_entropy(out, yb.long())
                    acc = (out.argmax(1) == yb).float().mean() * 100  # logged by DDPM-Seg every step
                    loss.backward(); opt.step()
                    loss.item(), acc.item()
        else:
            for epoch in range(cfg.max_epochs):
                order = member_order(len(y), cfg.seed + e, epoch)
                for s in range(0, len(y), cfg.batch_size):
                    idx = order[s:s + cfg.batch_size]
                    loss = F.cross_entropy(net(X[idx]), y[idx])
                    opt.zero_grad(); loss.backward(); opt.step()
    return time.perf_counter() - t0


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256, help="feature dims of the timing run")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--size", type=int, default=32, help="image side of the timing run")
    a = ap.parse_args()

    # 1. timing: identical data, seeds and step counts (early stopping off: min_epochs > epochs)
    g = torch.Generator().manual_seed(0)
    s = a.size
    fm = FeatureMaps({(0, "a"): torch.randn(a.images, a.dim, s // 4, s // 4, generator=g)}, (s, s))
    labels = fm.dense()[:, :4].argmax(1)  # 4 learnable classes
    cfg = EnsembleConfig(num_classes=4, max_epochs=a.epochs, min_epochs=a.epochs + 1)
    t0 = time.perf_counter()
    PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False)
    t_ours = time.perf_counter() - t0
    t_lean = reference_fit(fm, labels, cfg, "lean")
    t_ddpm = reference_fit(fm, labels, cfg, "ddpmseg")
    steps = a.epochs * -(-labels.numel() // cfg.batch_size)
    print(f"timing: {a.images} images {s}x{s}, {a.dim} dims, 10 members x {steps} steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"  batched ensemble (PixelEnsemble.fit): {t_ours:.2f} s")
    print(f"  sequential, DDPM-Seg's loop (DataLoader, per-step accuracy): {t_ddpm:.2f} s"
          f"  -> speed-up {t_ddpm / t_ours:.1f}x  (goal >= 5x)")
    print(f"  sequential, lean loop (same math, direct indexing): {t_lean:.2f} s"
          f"  -> speed-up {t_lean / t_ours:.1f}x  (batching alone)")

    # 2. memory on the DDPM-256 topology (shapes of blocks 5,6,7,8,12 from a dry run of its config)
    shapes = [(512, 32), (256, 32), (256, 32), (256, 64), (128, 128)]  # (channels, side); see tests/test_real_layouts
    before = rss_mib()
    maps = {(t, f"b{i}"): torch.randn(20, c, r, r, dtype=torch.float16)
            for t in (50, 150, 250) for i, (c, r) in enumerate(shapes)}
    fm = FeatureMaps(maps, (256, 256))
    labs = torch.randint(0, 28, (20, 256, 256))
    store = fm.nbytes()
    mid = rss_mib()
    PixelEnsemble(EnsembleConfig(num_classes=28, max_steps=200), fm.channels).fit(fm, labs, progress=False)
    peak = rss_mib()
    dense = 20 * fm.channels * 256 * 256 * 4
    ours = store + max(0.0, peak - mid) * 2**20
    print(f"memory: 20 images 256x256, {fm.channels} dims (DDPM-256 topology, blocks 5,6,7,8,12 x 3 t)")
    print(f"  lazy store {store / 2**20:.0f} MiB + training peak {max(0.0, peak - mid):.0f} MiB (measured RSS growth)")
    print(f"  DDPM-Seg dense fp32 matrix: {dense / 2**30:.1f} GiB (20 x {fm.channels} x 256 x 256 x 4 B, from shapes)")
    print(f"  memory ratio dense / ours: {dense / ours:.0f}x")


if __name__ == "__main__":
    main()
