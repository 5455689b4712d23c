"""Does the pixel ensemble's hand-written backward pass earn its place? It against plain autograd.

One training step of the 10 stacked DDPM-Seg members (forward, backward, Adam), two ways, on the same
parameters and batches:

  hand      ``pixel_classifier._train_step`` (the hand-written backward, weight gradients into reused buffers) and
            the ensemble's own Adam (``pixel_classifier._Adam``, fused where torch's fused Adam runs), as ``fit``
            runs them;
  autograd  the same stacked network written with the same torch ops (``baddbmm``, batch statistics, affine,
            log-softmax), ``loss.sum().backward()`` and ``torch.optim.Adam`` (fused likewise) on the stacked tensors.

Settings (batch 64, 10 members, 11 classes, hidden (128, 32) as DDPM-Seg's K < 30 members): the input widths of
the benchmark in ``benchmarks/ensemble.py``: 256 (bench), 576 (notebook 02 on the toy), 8448 (ADM-256 at its
five blocks and three t). Prints the median time per step of each and their ratio (autograd / hand), measured
in this process with the thread count printed, plus the largest gradient difference (the two must agree).

    OMP_NUM_THREADS=2 python benchmarks/pixel_backward.py [--steps 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffseg_utils.pixel_classifier import EnsembleConfig, PixelEnsemble, _Adam, _fused_adam_works, _train_step


def autograd_step(P: list[torch.Tensor], R: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg: EnsembleConfig):
    """The stacked members' training step through autograd (``P`` leaf tensors requiring grad)."""
    W, bias, gamma, beta = P[0:3], P[3:6], P[6:8], P[8:10]
    b, h = x.shape[1], x
    for i in range(2):
        a = torch.baddbmm(bias[i], h, W[i]).relu()
        mean = a.mean(1, keepdim=True)
        var = ((a - mean) ** 2).mean(1, keepdim=True)
        with torch.no_grad():
            R[i].lerp_(mean, cfg.bn_momentum)
            R[2 + i].lerp_(var * (b / (b - 1)), cfg.bn_momentum)
        h = (a - mean) * torch.rsqrt(var + cfg.bn_eps) * gamma[i] + beta[i]
    logp = torch.log_softmax(torch.baddbmm(bias[2], h, W[2]), -1)
    loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)   # (E,) per member
    loss.sum().backward()                                            # members are independent: their own gradients
    return loss.detach()


def bench(dim: int, steps: int, seed: int = 0) -> dict:
    cfg = EnsembleConfig(num_classes=11, seed=seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(cfg.num_members, cfg.batch_size, dim, generator=g) for _ in range(8)]
    ys = [torch.randint(0, 11, (cfg.num_members, cfg.batch_size), generator=g) for _ in range(8)]
    hand = PixelEnsemble(cfg, dim)
    fused = _fused_adam_works(torch.device("cpu"))
    H = [p.clone() for p in hand.params()]
    RH = [r.clone() for r in hand.running_mean + hand.running_var]
    gw = [torch.empty_like(w) for w in H[:3]]
    opt_h = _Adam(H, cfg.lr, fused)
    P = [p.clone().requires_grad_(True) for p in hand.params()]
    R = [r.clone() for r in hand.running_mean + hand.running_var]
    opt_a = torch.optim.Adam(P, lr=cfg.lr, fused=True) if fused else torch.optim.Adam(P, lr=cfg.lr, foreach=True)
    # the gradients agree (first step, same parameters)
    _, grads = hand.train_step(xs[0], ys[0])
    autograd_step(P, [r.clone() for r in R], xs[0], ys[0], cfg)
    diff = max(float((p.grad - gr).abs().max() / gr.abs().max().clamp_min(1e-30)) for p, gr in zip(P, grads))
    for p in P:
        p.grad = None
    times = {"hand": [], "autograd": []}
    for s in range(steps):
        x, y = xs[s % 8], ys[s % 8]
        t0 = time.perf_counter()
        _, grads = _train_step(H, RH, x, y, cfg, gw_out=gw)
        opt_h.step(H, grads)
        times["hand"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opt_a.zero_grad(set_to_none=True)
        autograd_step(P, R, x, y, cfg)
        opt_a.step()
        times["autograd"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[steps // 10:]) for k, v in times.items()}   # the first tenth warms up
    return {"dim": dim, **{f"{k}_ms": 1e3 * v for k, v in med.items()}, "ratio": med["autograd"] / med["hand"],
            "max_rel_grad_diff": diff, "fused": fused}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dims", type=int, nargs="+", default=[256, 576, 8448])
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fused Adam: {_fused_adam_works(torch.device('cpu'))}; "
          "median ms per step of 10 members, batch 64")
    print(f"{'input dims':>10}{'hand':>10}{'autograd':>10}{'autograd / hand':>17}{'max rel. grad diff':>20}")
    for d in a.dims:
        r = bench(d, a.steps)
        print(f"{r['dim']:>10}{r['hand_ms']:>10.2f}{r['autograd_ms']:>10.2f}{r['ratio']:>17.2f}{r['max_rel_grad_diff']:>20.1e}")


if __name__ == "__main__":
    main()
