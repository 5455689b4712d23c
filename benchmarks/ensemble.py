"""The batched MLP ensemble vs DDPM-Seg's one-member-at-a-time training, and its memory.

Prints, in one run:
  1. wall time of fitting 10 members batched (``PixelEnsemble.fit``) vs the logic of DDPM-Seg's
     released loop (``train_interpreter.py``: each member alone, one after another, a DataLoader
     over a per-row dataset, batch 64, Adam lr 1e-3, the batch accuracy and ``loss.item()`` every
     step, early stop once more than 50 batches in a row fail to beat the best batch loss from
     the 5th epoch on), on identical features, initial weights and batch orders, in three
     settings (goal: >= 5x in each):
       bench     256 dims, 20 images 32x32, 2 epochs (640 steps per member), no early stopping;
       notebook  notebook 02's setting: 576 dims (9 maps x 64 ch at 8x8 / 4x4, fp16, as the toy
                 backbone's 3 blocks x 3 t), 20 images 64x64, 10 000 training pixels, the paper's
                 early stopping (runs until every member stopped);
       full      8448 dims (ADM-256's output blocks 5,6,7,8,12 x t 50,150,250), 2 images 256x256,
                 4096 training pixels, 1 epoch (64 steps per member): the per-step cost at full
                 width; the step count is reduced to keep the CPU run short (cost is a fixed
                 multiple of steps). Ours twice: pixel table (the default when the training
                 pixels' features fit in ``cache_bytes``) and interpolating every batch (what a
                 full 20-image training set at 256x256 falls back to).
  2. with --breakdown: where one training step's time goes at the full 8448 dims, for one member
     of DDPM-Seg's loop and for our 10 stacked members: the first layer's forward matmul, its
     weight-gradient matmul and Adam's update of its weights (the arithmetic every faithful loop
     must do), against the whole step. The sum of those three parts bounds the speed-up any loop
     doing the same arithmetic can reach over DDPM-Seg's loop.
  3. memory of training on 20 images at 256x256 with the google DDPM-256 topology's features
     (blocks {5,6,7,8,12} x t {50,150,250} = 4224 dims; random values and labels): our
     lazy store + measured training peak vs DDPM-Seg's dense fp32 pixel matrix, whose size is
     computed from the shapes (20 x 4224 x 256 x 256 x 4 bytes), never allocated.

    OMP_NUM_THREADS=2 python benchmarks/ensemble.py [--settings bench notebook full] [--lean] [--breakdown]
                                                    [--skip-memory]

Ratios are measured in one process, so they hold for the thread count it runs with (printed);
with OMP_NUM_THREADS=2 the whole run (all three parts, --lean) took about 4 minutes on 2 cores. Both wall
time and this process's CPU time are printed: on a machine shared with other jobs the CPU-time ratio
is the steadier figure, since preemption inflates wall time unevenly.
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

# ADM-256 (guided-diffusion, 256 base channels, channel_mult 1,1,2,2,4,4): output_blocks 5,6,7,8,12
# give (channels, side) = (1024, 32), (512, 32), (512, 32), (512, 64), (256, 128) -> 2816 per t
ADM_BLOCKS = [(1024, 32), (512, 32), (512, 32), (512, 64), (256, 128)]
# google/ddpm-ema-*-256 (half the channels): the same blocks, 1408 per t (see tests/test_real_layouts)
GOOGLE_BLOCKS = [(512, 32), (256, 32), (256, 32), (256, 64), (128, 128)]


class PixelRows(torch.utils.data.Dataset):
    """DDPM-Seg's FeatureDataset: one (feature row, label) pair per item."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


class MemberOrder(torch.utils.data.Sampler):
    """Shuffles like ``DataLoader(shuffle=True)``, but in the member's own order (``member_order``),
    so both sides see the same batches and stop at the same step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = member_order(self.n, self.seed, self.epoch)
        self.epoch += 1
        return iter(order.tolist())


def _member(d: int, cfg: EnsembleConfig, seed: int):
    h1, h2 = cfg.widths()
    net = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.BatchNorm1d(h1), nn.Linear(h1, h2), nn.ReLU(),
                        nn.BatchNorm1d(h2), nn.Linear(h2, cfg.num_classes))
    with torch.no_grad():
        for lin, w in zip([net[0], net[3], net[6]], member_init(d, cfg, seed)):
            lin.weight.copy_(w.T); lin.bias.zero_()
    return net, torch.optim.Adam(net.parameters(), lr=cfg.lr)


def training_pixels(labels: torch.Tensor, cfg: EnsembleConfig, max_pixels: int | None) -> torch.Tensor:
    """The flat pixel indices ``PixelEnsemble.fit`` trains on (same subset rule)."""
    flat = torch.nonzero(labels.reshape(-1) != cfg.ignore_index).squeeze(1)
    if max_pixels is not None and flat.numel() > max_pixels:
        keep = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:max_pixels]
        flat = flat[keep.sort().values]
    return flat


def reference_fit(fm: FeatureMaps, labels: torch.Tensor, cfg: EnsembleConfig, loop: str,
                  max_pixels: int | None = None) -> tuple[float, float, int]:
    """Each member alone over a materialised matrix of the training pixels; returns (wall seconds,
    process CPU seconds, member steps).

    loop="ddpmseg": DDPM-Seg's train loop as released (DataLoader over a per-row dataset, batch
    accuracy and loss.item() every step, its early-stopping rule). loop="lean": the same
    arithmetic with the fat trimmed (direct indexing, the stopping rule only where it is on).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    H, W = fm.image_size
    flat = training_pixels(labels, cfg, max_pixels)
    X = fm.sample(flat // (H * W), (flat // W) % H, flat % W)   # = dense()[..] for these pixels
    y = labels.reshape(-1)[flat].to(torch.uint8)                  # DDPM-Seg keeps labels as uint8
    steps = 0
    for e in range(cfg.num_members):
        net, opt = _member(fm.channels, cfg, cfg.seed + e)
        net.train()
        best, strikes, stop = float("inf"), 0, False
        if loop == "ddpmseg":
            batches = torch.utils.data.DataLoader(PixelRows(X, y), batch_size=cfg.batch_size,
                                                  sampler=MemberOrder(len(y), cfg.seed + e))
        for epoch in range(cfg.max_epochs):
            if loop == "lean":
                order = member_order(len(y), cfg.seed + e, epoch)
                batches = ((X[i], y[i]) for i in order.split(cfg.batch_size))
            for xb, yb in batches:
                yb = yb.long()
                opt.zero_grad()
                out = net(xb)
                loss = F.cross_entropy(out, yb)
                if loop == "ddpmseg":  # multi_acc, logged by DDPM-Seg every step
                    acc = (out.log_softmax(1).argmax(1) == yb).float().sum() / len(yb) * 100  # noqa: F841 (cost, not value)
                loss.backward(); opt.step()
                steps += 1
                if epoch >= cfg.min_epochs:
                    if loss.item() < best:
                        best, strikes = loss.item(), 0
                    else:
                        strikes += 1
                    if strikes > cfg.patience:
                        stop = True
                        break
            if stop:
                break
    return time.perf_counter() - t0, time.process_time() - c0, steps


def ours_fit(fm, labels, cfg, max_pixels=None, cache_bytes=2**30) -> tuple[float, float, int, int]:
    """(wall seconds, process CPU seconds, batched steps, member steps in all) of PixelEnsemble.fit."""
    t0, c0 = time.perf_counter(), time.process_time()
    ens = PixelEnsemble(cfg, fm.channels).fit(fm, labels, progress=False, max_pixels=max_pixels,
                                              cache_bytes=cache_bytes)
    return time.perf_counter() - t0, time.process_time() - c0, ens.steps_trained, sum(ens.member_steps)


def _maps(shapes, n, ts, g, dtype):
    """Random maps {(t, block): (n, c, s, s)} in ``dtype``."""
    return {(t, f"b{i}"): torch.randn(n, c, s, s, generator=g).to(dtype) for t in ts for i, (c, s) in enumerate(shapes)}


def setting(name: str):
    """(description, features, labels, config, max_pixels) of one timing setting."""
    g = torch.Generator().manual_seed(0)
    if name == "bench":
        fm = FeatureMaps({(0, "a"): torch.randn(20, 256, 8, 8, generator=g)}, (32, 32))
        labels = fm.dense()[:, :4].argmax(1)   # 4 learnable classes
        cfg = EnsembleConfig(num_classes=4, max_epochs=2, min_epochs=3)   # 2 epochs, no early stopping
        return "256 dims, 20 images 32x32, 2 epochs, no early stopping", fm, labels, cfg, None
    if name == "notebook":
        fm = FeatureMaps(_maps([(64, 8), (64, 8), (64, 4)], 20, (50, 100, 200), g, torch.float16), (64, 64))
        # 11 classes from a fixed random linear read-out of the features, with 10% label noise, so the
        # batch loss plateaus and early stopping fires after a few epochs, as on the toy world
        dense = fm.dense()
        labels = torch.einsum("nchw,ck->nkhw", dense, torch.randn(fm.channels, 11, generator=g)).argmax(1)
        noise = torch.rand(labels.shape, generator=g) < 0.1
        labels[noise] = torch.randint(0, 11, (int(noise.sum()),), generator=g)
        cfg = EnsembleConfig(num_classes=11)
        return "576 dims, 20 images 64x64, 10000 pixels, early stopping (notebook 02)", fm, labels, cfg, 10_000
    if name == "full":
        fm = FeatureMaps(_maps(ADM_BLOCKS, 2, (50, 150, 250), g, torch.float16), (256, 256))
        labels = torch.randint(0, 34, (2, 256, 256), generator=g)
        cfg = EnsembleConfig(num_classes=34, max_epochs=1, min_epochs=2)  # FFHQ-34's classes; 1 epoch
        return "8448 dims (ADM-256), 2 images 256x256, 4096 pixels, 1 epoch", fm, labels, cfg, 4096
    raise ValueError(f"unknown setting {name!r}; choose from bench, notebook, full")


def _median_seconds(fn, reps: int = 7) -> float:
    fn()  # warm-up: first-touch page faults and kernel selection
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def breakdown(dim: int = 8448, num_classes: int = 34, members: int = 10) -> None:
    """Part 2: one training step at ``dim`` dims, taken apart (median of 7 timed repeats each)."""
    from diffseg_utils.pixel_classifier import _Adam, _fused_adam_works, _train_step

    cfg = EnsembleConfig(num_classes=num_classes, num_members=members)
    (h1, _), B, E = cfg.widths(), cfg.batch_size, members
    g = torch.Generator().manual_seed(0)
    x1, y1 = torch.randn(B, dim, generator=g), torch.randint(0, num_classes, (B,), generator=g)
    dz1 = torch.randn(B, h1, generator=g)
    w1, b1 = torch.randn(dim, h1, generator=g) * 0.02, torch.zeros(h1)
    gw1 = torch.empty_like(w1)
    adam1 = _Adam([w1], cfg.lr, _fused_adam_works(torch.device("cpu")))
    net, opt = _member(dim, cfg, 0)
    net.train()

    def ref_step():
        opt.zero_grad()
        out = net(x1)
        loss = F.cross_entropy(out, y1)
        loss.backward(); opt.step()
        loss.item()

    ref = {"whole step (nn.Sequential + autograd + torch.optim.Adam, DDPM-Seg's loop without its DataLoader)":
           _median_seconds(ref_step),
           f"first layer forward matmul ({B} x {dim} @ {dim} x {h1})": _median_seconds(
               lambda: torch.addmm(b1, x1, w1)),
           f"first layer weight gradient ({dim} x {B} @ {B} x {h1})": _median_seconds(
               lambda: torch.mm(x1.T, dz1, out=gw1)),
           "Adam on the first layer's weights": _median_seconds(lambda: adam1.step([w1], [gw1]))}
    ours_member = PixelEnsemble(cfg, dim)
    P = [t.clone() for t in ours_member.params()]
    R = [t.clone() for t in ours_member.running_mean + ours_member.running_var]
    gw = [torch.empty_like(w) for w in P[:3]]
    xE, yE = torch.randn(E, B, dim, generator=g), torch.randint(0, num_classes, (E, B), generator=g)
    dzE = torch.randn(E, B, h1, generator=g)
    adamE = _Adam(P, cfg.lr, _fused_adam_works(torch.device("cpu")))
    adamW = _Adam([P[0]], cfg.lr, _fused_adam_works(torch.device("cpu")))

    def our_step():
        _, grads = _train_step(P, R, xE, yE, cfg, gw_out=gw)
        adamE.step(P, grads)

    ours = {"whole step (stacked members, hand-written backward, fused Adam)": _median_seconds(our_step),
            "first layer forward matmul (batched)": _median_seconds(lambda: torch.baddbmm(P[3], xE, P[0])),
            "first layer weight gradient (batched)": _median_seconds(
                lambda: torch.bmm(xE.transpose(1, 2), dzE, out=gw[0])),
            "Adam on the first layer's weights": _median_seconds(lambda: adamW.step([P[0]], [gw[0]]))}
    r_whole, r_parts = list(ref.values())[0], sum(list(ref.values())[1:])
    o_whole, o_parts = list(ours.values())[0], sum(list(ours.values())[1:])
    print(f"where a training step's time goes at {dim} dims, h1 = {h1}, batch {B} ({torch.get_num_threads()} threads; "
          f"median of 7):")
    print(f"  DDPM-Seg's loop, one member; x {E} for {E} members:")
    for k, v in ref.items():
        print(f"    {1e3 * v:8.2f} ms  x{E} = {1e3 * E * v:8.1f} ms  {k}")
    print(f"  ours, {E} members in one step:")
    for k, v in ours.items():
        print(f"    {1e3 * v:8.2f} ms  {k}")
    print(f"  the first layer's forward + weight gradient + Adam is {r_parts / r_whole:.0%} of DDPM-Seg's step and "
          f"{o_parts / o_whole:.0%} of ours;")
    print(f"  measured speed-up per step {E * r_whole / o_whole:.1f}x; bound for any loop that does this arithmetic "
          f"(DDPM-Seg's {E} steps / {E} x those three parts): {r_whole / r_parts:.1f}x")


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux); ru_maxrss where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Free what the allocator holds (run_all's ``_release_free_memory``) and reset the kernel's RSS
    high-water mark (``clear_refs`` 5), so the peak read afterwards belongs to what runs next, not to
    building the test data."""
    from run_all import _release_free_memory

    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory() -> None:
    """Part 3: RSS growth of one fit on 20 images at 256x256, against the dense matrix's size from shapes."""
    fm = FeatureMaps(_maps(GOOGLE_BLOCKS, 20, (50, 150, 250), torch.Generator().manual_seed(0), torch.float16),
                     (256, 256))
    labs = torch.randint(0, 28, (20, 256, 256))
    store = fm.nbytes()
    _reset_peak()
    mid = _status_mib("VmRSS")
    PixelEnsemble(EnsembleConfig(num_classes=28, max_steps=200), fm.channels).fit(fm, labs, progress=False)
    grow = max(0.0, _status_mib("VmHWM") - mid)
    dense = 20 * fm.channels * 256 * 256 * 4
    ours = store + grow * 2**20
    print(f"memory: 20 images 256x256, {fm.channels} dims (DDPM-256 topology, blocks 5,6,7,8,12 x 3 t), 200 batches")
    print(f"  lazy store {store / 2**20:.0f} MiB + training peak {grow:.0f} MiB (measured: RSS high-water mark above "
          f"the RSS before the fit)")
    print(f"  DDPM-Seg dense fp32 matrix: {dense / 2**30:.1f} GiB (20 x {fm.channels} x 256 x 256 x 4 B, from shapes)")
    print(f"  memory ratio dense / ours: {dense / ours:.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["bench", "notebook", "full"])
    ap.add_argument("--lean", action="store_true", help="also time the trimmed sequential loop")
    ap.add_argument("--breakdown", action="store_true", help="take one 8448-dim training step apart (part 2)")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    if not a.skip_memory:
        memory()
    if a.breakdown:
        breakdown()

    print(f"timing ({torch.get_num_threads()} threads; 10 members; identical features, initial weights, "
          f"batch orders and stopping rule on both sides)")
    for name in a.settings:
        desc, fm, labels, cfg, max_pixels = setting(name)
        t_ours, c_ours, s_ours, m_ours = ours_fit(fm, labels, cfg, max_pixels)
        t_ref, c_ref, s_ref = reference_fit(fm, labels, cfg, "ddpmseg", max_pixels)
        print(f"[{name}] {desc}")
        print(f"  batched ensemble (PixelEnsemble.fit): {t_ours:7.2f} s wall {c_ours:7.2f} s CPU  ({s_ours} batched steps, "
              f"{m_ours} member steps)")
        print(f"  DDPM-Seg's loop, members one by one:  {t_ref:7.2f} s wall {c_ref:7.2f} s CPU  ({s_ref} member steps)")
        print(f"  -> speed-up {t_ref / t_ours:.1f}x wall, {c_ref / c_ours:.1f}x CPU time  (goal >= 5x)")
        if name == "full":
            t_lazy, c_lazy, _, _ = ours_fit(fm, labels, cfg, max_pixels, cache_bytes=0)
            print(f"  batched, interpolating every batch:   {t_lazy:7.2f} s wall {c_lazy:7.2f} s CPU"
                  f"  -> speed-up {t_ref / t_lazy:.1f}x wall, {c_ref / c_lazy:.1f}x CPU")
        if a.lean:
            t_lean, c_lean, _ = reference_fit(fm, labels, cfg, "lean", max_pixels)
            print(f"  lean sequential loop (same math, direct indexing): {t_lean:.2f} s wall {c_lean:.2f} s CPU"
                  f"  -> speed-up {t_lean / t_ours:.1f}x wall, {c_lean / c_ours:.1f}x CPU  (batching alone)")
        del fm, labels



if __name__ == "__main__":
    main()
