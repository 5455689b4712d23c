"""EmerDiff per image: batched modulated runs (shared prefix) vs a per-segment loop.

Prints, in one run on the same image, K and noise:
  1. wall time of ``emerdiff_segment`` (all 2K runs batched) vs the straightforward loop
     (``reference_modulated_run`` for each segment and sign: full UNet on [unmodulated,
     modulated] at t_m, then its own denoising), and the speed-up (goal >= 3x on CPU);
  2. UNet evaluations per image against the method's minimum (1 k-means pass + 1 unmodulated
     pass for attention injection + 2K runs x denoising steps);
  3. that both give the same images (max abs difference);
  4. k-means on the image's low-resolution queries: inertia of one k-means++ start and of the
     default best-of-restarts, each over scikit-learn's ``KMeans(n_init=10)`` (goal <= 1.02);
  5. on CUDA, peak memory of EmerDiff with all 2K images decoded in one VAE batch vs the default
     ``decode_batch_size`` (the difference maps are reduced chunk by chunk).

    python benchmarks/emerdiff.py [--backbone toy] [--segments 6] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from diffseg_utils import load_backbone
from diffseg_utils.attention import ControlledAttnProcessor
from diffseg_utils.emerdiff import _denoise_timesteps, emerdiff_segment, kmeans, reference_modulated_run
from diffseg_utils.hooks import AttentionProcessors
from diffseg_utils.toy.world import render


def _inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    x = x.double().cpu()
    labels = labels.cpu()
    return sum(float(((x[labels == k] - x[labels == k].mean(0)) ** 2).sum()) for k in labels.unique())


def kmeans_report(bb, img, segments: int, query_layer: str) -> None:
    """Item 4: k-means restarts against scikit-learn on the image's query vectors at t_f = 1."""
    z0 = bb.encode(bb.preprocess(img))
    cap = ControlledAttnProcessor(capture_query=True)
    with AttentionProcessors(bb.denoiser, {query_layer: cap}):
        bb.predict(bb.add_noise(z0, 1, torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))), 1)
    q = cap.query[0]
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("k-means: scikit-learn not installed, comparison skipped")
        return
    ref = KMeans(segments, n_init=10, random_state=0).fit(q.double().cpu().numpy()).inertia_
    one = _inertia(q, kmeans(q, segments, n_init=1)[0]) / ref
    best = _inertia(q, kmeans(q, segments)[0]) / ref
    print(f"k-means inertia / scikit-learn KMeans(n_init=10) on {tuple(q.shape)} queries: one start {one:.3f}, "
          f"default restarts {best:.3f}  (goal <= 1.02)")


def decode_memory_report(bb, img, segments: int, steps: int) -> None:
    """Item 5: peak CUDA memory with one decode batch of 2K images vs the default chunks."""
    if bb.device.type != "cuda":
        print("decode memory: measured on CUDA only (run with --device cuda)")
        return
    peaks = {}
    for name, b in (("one batch", 2 * segments), ("default chunks", None)):
        kw = {} if b is None else {"decode_batch_size": b}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        emerdiff_segment(bb, img, segments, num_steps=steps, progress=False, **kw)
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    print("peak CUDA memory: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy")
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    bb = load_backbone(a.backbone, device=a.device)
    img = render("eval", 0, 1).images
    kw = dict(num_steps=a.steps, return_images=True, progress=False)
    emerdiff_segment(bb, img, a.segments, **kw)  # warm-up
    t0 = time.perf_counter()
    res = emerdiff_segment(bb, img, a.segments, **kw)
    t_batched = time.perf_counter() - t0

    x = bb.preprocess(img)
    z0 = bb.encode(x)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)).to(z0)
    ts = _denoise_timesteps(bb, 281, a.steps)
    z_tm = bb.add_noise(z0, 281, eps)
    ids = torch.unique(res.low_res[0])
    t0 = time.perf_counter()
    worst = 0.0
    for k in ids.tolist():
        mask = (res.low_res[0] == k).to(bb.dtype)
        for sign, ref in ((1.0, res.images_plus), (-1.0, res.images_minus)):
            out = bb.decode(reference_modulated_run(bb, z_tm, mask, sign, 10.0, ts, res.layer, True))
            worst = max(worst, float((out[0].float() - ref[0, k]).abs().max()))
    t_loop = time.perf_counter() - t0 + 0.0
    print(f"{bb.name}: K = {len(ids)} segments, {len(ts)} denoising steps from t_m = 281")
    print(f"per-segment loop: {t_loop:.2f} s   batched: {t_batched:.2f} s (includes k-means pass and decoding)")
    print(f"speed-up batched / loop: {t_loop / t_batched:.1f}x  (goal >= 3x)")
    loop_evals = 1 + 2 * len(ids) * (2 + len(ts) - 1)  # each run: [unmod, mod] at t_m, then its steps
    print(f"UNet evaluations per image: batched {res.denoiser_evals_per_image:.0f}, loop {loop_evals}, "
          f"method minimum {res.min_denoiser_evals_per_image}")
    print(f"max |batched - loop| over all modulated images: {worst:.2e}")
    kmeans_report(bb, img, a.segments, res.extra["query_layer"])
    decode_memory_report(bb, img, a.segments, a.steps)


if __name__ == "__main__":
    main()
