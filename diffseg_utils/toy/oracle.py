"""The oracle segmenter: our stand-in for an off-the-shelf detector (Mask R-CNN in the paper).

A small CNN trained on procedural toy images with exact labels for *all* categories. It labels
generated images (Grounded Diffusion's data pipeline), measures prompt fidelity, and serves as
ground truth on generated images. Its interface is one a real detector can satisfy too::

    out = oracle(images)            # (N, 3, H, W) in [-1, 1]
    out.masks   # (N, K, H, W) bool, one mask per category (K = len(out.class_names))
    out.scores  # (N, K) float in [0, 1]; 0 where the category was not found

Train: ``python -m diffseg_utils.toy.oracle --out data/oracle`` (resumable).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..grounding.segmenter import SegmenterOutput  # noqa: F401  (the general interface; importable from here too)
from ..metrics import confusion_matrix, iou_per_class
from .world import CATEGORIES, NUM_CLASSES, render


def _faces(split: str, start: int, count: int):
    from .faces import render_faces

    return render_faces(split, start, count)


WORLDS: dict[str, tuple] = {
    # world -> (render(split, start, count) with .images / .labels, class names without background)
    "shapes": (render, CATEGORIES),
    "faces": (_faces, None),  # names filled in lazily below (avoids importing faces at import time)
}


def world_spec(world: str) -> tuple:
    """``(render, class_names)`` of a toy world ("shapes" or "faces")."""
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; valid: {sorted(WORLDS)}")
    fn, names = WORLDS[world]
    if names is None:
        from .faces import PARTS

        names = PARTS
    return fn, tuple(names)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class OracleNet(nn.Module):
    """A 4-level U-Net for (N, 3, 64, 64) images in [-1, 1] -> (N, NUM_CLASSES, 64, 64) logits."""

    def __init__(self, width: int = 24, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = [width, width * 2, width * 4, width * 4]
        self.enc = nn.ModuleList([_block(3, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])
        self.dec = nn.ModuleList([_block(w[3] + w[2], w[2]), _block(w[2] + w[1], w[1]), _block(w[1] + w[0], w[0])])
        self.head = nn.Conv2d(w[0], num_classes, 1)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, e in enumerate(self.enc):
            x = e(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for d, s in zip(self.dec, reversed(skips[:-1])):
            x = d(torch.cat([F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False), s], 1))
        return self.head(x)


class OracleSegmenter:
    """The detector interface around :class:`OracleNet` (see module doc)."""

    def __init__(self, net: OracleNet, class_names: tuple[str, ...] = CATEGORIES, min_pixels: int = 20):
        self.net = net.eval()
        self.class_names = class_names
        self.min_pixels = min_pixels

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "OracleSegmenter":
        path = Path(path)
        f = path / "oracle.pt"
        if not f.exists():
            raise FileNotFoundError(f"no oracle segmenter at {f}; train it with "
                                    f"`python -m diffseg_utils.toy.oracle --out {path}`")
        st = torch.load(f, map_location=device, weights_only=True)  # tensors, ints and strings only: runs no code
        net = OracleNet(st["width"], len(st["class_names"]) + 1).to(device)
        net.load_state_dict(st["model"])
        return cls(net, tuple(st["class_names"]))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device, torch.float32))

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W) label maps, 0 = background."""
        return self.logits(images).argmax(1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> SegmenterOutput:
        prob = self.logits(images).softmax(1)
        lab = prob.argmax(1)
        k = len(self.class_names)
        masks = torch.stack([lab == c + 1 for c in range(k)], 1)
        area = masks.sum((2, 3))
        score = (prob[:, 1:] * masks).sum((2, 3)) / area.clamp_min(1)
        score = torch.where(area >= self.min_pixels, score, torch.zeros_like(score))
        masks = masks & (area >= self.min_pixels)[..., None, None]
        return SegmenterOutput(masks=masks, scores=score, class_names=self.class_names)


@torch.no_grad()
def procedural_confusion(predict_labels, n: int, split: str = "oracle_test", chunk: int = 250,
                         world: str = "shapes") -> torch.Tensor:
    """Confusion matrix (world class ids, background 0) of ``predict_labels`` — (N, 3, H, W) images in [-1, 1]
    -> (N, H, W) labels — against the exact labels of the first ``n`` images of a procedural split."""
    draw, names = world_spec(world)
    k = len(names) + 1
    cm = torch.zeros(k, k, dtype=torch.long)
    for s in range(0, n, chunk):
        b = draw(split, s, min(chunk, n - s))
        x = torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 127.5 - 1
        cm += confusion_matrix(predict_labels(x).cpu(), torch.from_numpy(b.labels), k, ignore_index=None)
    return cm


def evaluate(seg: OracleSegmenter, n: int = 500, split: str = "oracle_test", chunk: int = 250,
             world: str = "shapes") -> float:
    """mIoU (background included) on ``n`` held-out procedural images."""
    cm = procedural_confusion(seg.predict_labels, n, split, chunk, world)
    return float(np.nanmean(iou_per_class(cm).numpy()))


def train(out: Path, steps: int = 3000, batch: int = 32, lr: float = 2e-3, width: int = 24, seed: int = 0,
          eval_every: int = 500, world: str = "shapes") -> float:
    """Train (or resume) the oracle of a toy world on its ``oracle`` split; returns held-out mIoU."""
    draw, names = world_spec(world)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "oracle_ckpt.pt"
    torch.manual_seed(seed)
    net = OracleNet(width, len(names) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
    t0 = time.process_time()
    miou = float("nan")
    for step in (bar := tqdm(range(start, steps), desc="oracle", initial=start, total=steps)):
        net.train()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        b = draw("oracle", step * batch, batch)
        x = torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.from_numpy(b.labels).long()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            net.eval()
            miou = evaluate(OracleSegmenter(net, names), n=250, world=world)
            bar.set_postfix(loss=f"{loss.item():.3f}", miou=f"{miou:.3f}")
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ck)
    net.eval()
    miou = evaluate(OracleSegmenter(net, names), n=500, world=world)
    torch.save({"model": net.state_dict(), "width": width, "class_names": list(names)}, out / "oracle.pt")
    (out / "oracle.json").write_text(json.dumps({"world": world, "test_miou": miou, "steps": steps, "batch": batch, "lr": lr,
                                                 "width": width, "cpu_seconds_last_run": time.process_time() - t0},
                                                indent=1))
    return miou


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy world's oracle segmenter (resumable).")
    p.add_argument("--out", type=Path, default=Path("data/oracle"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--world", default="shapes", choices=sorted(WORLDS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    miou = train(a.out, a.steps, a.batch, a.lr, a.width, world=a.world)
    print(f"oracle test mIoU (500 held-out images): {miou:.4f}")


if __name__ == "__main__":
    main()
