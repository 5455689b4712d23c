"""Feature store size and extraction overhead on the google DDPM-256 topology (random weights).

DDPM-Seg's setting: ADM blocks {5, 6, 7, 8, 12} at t in {50, 150, 250}, 256x256 images.
Prints, in one run:
  1. bytes per image of our lazy FeatureMaps (fp16, native resolutions) vs DDPM-Seg's dense
     fp32 store (every map upsampled to 256x256: 4224 x 256 x 256 x 4 bytes, computed from the
     shapes, not allocated) and their ratio (goal >= 40x);
  2. extraction wall time / the same number of bare UNet forwards (goal <= 1.10).

    python benchmarks/features.py [--images 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffseg_utils.backbones import PixelBackbone
from diffseg_utils.features import extract_features, make_noise
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # topologies live with the test fixtures
from topologies import ddpm256_unet_config, ddpm_scheduler_config  # noqa: E402

BLOCKS, TIMESTEPS = [5, 6, 7, 8, 12], [50, 150, 250]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = PixelBackbone(unet=UNet2DModel(**ddpm256_unet_config()), scheduler=DDPMScheduler(**ddpm_scheduler_config()))
    print(bb)
    imgs = torch.rand(a.images, 3, 256, 256)

    fm = extract_features(bb, imgs, BLOCKS, TIMESTEPS, batch_size=1, progress=False)
    lazy = fm.nbytes() / a.images
    dense = fm.channels * 256 * 256 * 4  # DDPM-Seg: float32 [C, 256, 256] per image
    print(f"feature dims: {fm.channels} (DDPM-Seg with google/ddpm-ema ports: 4224)")
    print(f"lazy store:  {lazy / 2**20:8.1f} MiB / image (fp16, native resolution)")
    print(f"dense store: {dense / 2**20:8.1f} MiB / image (fp32, {fm.channels}x256x256, computed from shapes)")
    print(f"memory ratio dense / lazy: {dense / lazy:.1f}x  (goal >= 40x)")

    # wall time: extraction vs the same UNet forwards without hooks (batch = one image x 3 t)
    x = bb.preprocess(imgs)
    t_vec = torch.tensor(TIMESTEPS).repeat_interleave(1)

    def bare():
        for i in range(a.images):
            z0 = bb.encode(x[i:i + 1]).repeat(len(TIMESTEPS), 1, 1, 1)
            eps = make_noise(bb, 1, "shared").repeat(len(TIMESTEPS), 1, 1, 1)
            with torch.no_grad():
                bb.predict(bb.add_noise(z0, t_vec, eps), t_vec)

    def ours():
        extract_features(bb, imgs, BLOCKS, TIMESTEPS, batch_size=1, progress=False)

    bare(), ours()  # warm-up
    tb, to = [], []
    for _ in range(a.repeats):  # interleaved, best of
        s = time.perf_counter(); bare(); tb.append(time.perf_counter() - s)
        s = time.perf_counter(); ours(); to.append(time.perf_counter() - s)
    print(f"bare UNet forwards: {min(tb):.2f} s   extraction: {min(to):.2f} s")
    print(f"time ratio extraction / bare: {min(to) / min(tb):.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
