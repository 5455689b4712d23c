"""Measured quality of the tiny SD: reconstruction PSNR, prompt fidelity, probe gap.

These are the numbers notebook 00 prints and the tests check on small samples.
"""
from __future__ import annotations

import numpy as np
import torch

from ..backbones import Backbone
from ..metrics import psnr
from ..sampling import generate
from .world import CATEGORIES, caption_for, render


@torch.no_grad()
def reconstruction_psnr(backbone: Backbone, n: int = 64, split: str = "vae_test") -> float:
    """Mean PSNR (dB, images in [0, 1]) of VAE encode -> decode on held-out toy images."""
    b = render(split, 0, n)
    x = backbone.preprocess(b.images)
    return psnr(x, backbone.decode(backbone.encode(x)).clamp(-1, 1))


def fidelity_prompts(n: int, seed: int = 0, max_objects: int = 2) -> tuple[list[str], list[list[int]]]:
    """n prompts naming 1..max_objects distinct random categories, and their class ids."""
    rng = np.random.default_rng(seed)
    prompts, classes = [], []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        cls = [int(c) + 1 for c in rng.choice(len(CATEGORIES), size=k, replace=False)]
        classes.append(cls)
        prompts.append(caption_for([CATEGORIES[c - 1] for c in cls]))
    return prompts, classes


@torch.no_grad()
def prompt_fidelity(backbone: Backbone, oracle, n: int = 64, *, guidance: float = 5.0, num_steps: int = 25,
                    seed: int = 0, max_objects: int = 2, batch_size: int = 32) -> dict:
    """Fraction of generated images in which the oracle finds *every* prompted category.

    Also reports the per-object hit rate. Prompts are random 1..max_objects-object captions.
    """
    prompts, classes = fidelity_prompts(n, seed, max_objects)
    all_found, hits, total = 0, 0, 0
    for s in range(0, n, batch_size):
        imgs = generate(backbone, prompts[s:s + batch_size], num_steps=num_steps, guidance=guidance, seed=seed * 100_000 + s)
        found = oracle(imgs).scores > 0  # (b, K)
        for row, cls in zip(found, classes[s:s + batch_size]):
            ok = [bool(row[c - 1]) for c in cls]
            hits += sum(ok)
            total += len(ok)
            all_found += all(ok)
    return {"all_found": all_found / n, "object_hit_rate": hits / total, "n": n, "guidance": guidance}
