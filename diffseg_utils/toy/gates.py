"""Quality gates of the faces world's pixel DDPM: sample plausibility and the few-shot probe gap.

``python -m diffseg_utils.toy.train --world faces --stage gate`` measures every
``ddpm_<step>.pt`` (and ``ddpm.pt``) in ``--work`` into ``<out>/gates.json``:

* **plausibility**: unconditional DDIM samples, judged by the faces oracle
  (``data/oracle-faces``): the share of samples in which it finds every main part
  (:data:`MAIN_PARTS`, each at least ``min_pixels`` pixels);
* **probe**: :func:`~diffseg_utils.toy.quality.fewshot_probe` on the faces world (ridge sweep on
  validation images picks the place; one DDPM-Seg member MLP on 20 labelled images, scored on 20
  test images), and once the same probe on an untrained UNet, raw RGB and RGB + position.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from .faces import PARTS

MAIN_PARTS: tuple[str, ...] = ("skin", "left eye", "right eye", "nose", "mouth")
"""The parts every plausible face sample must show."""


def open_record(path: Path, protocol: dict) -> dict:
    """The gates record at ``path``; started over when it was measured with another ``protocol``."""
    rec = json.loads(path.read_text()) if path.exists() else {}
    return rec if rec.get("protocol") == protocol else {"protocol": protocol, "checkpoints": []}


def unmeasured_checkpoints(work: Path, prefix: str, rec: dict) -> dict[int, Path]:
    """step -> file of every ``<prefix>_<step>.pt`` / ``<prefix>.pt`` in ``work`` not yet in ``rec``, by step."""
    done = {r["step"] for r in rec["checkpoints"]}
    files = [*work.glob(f"{prefix}_*.pt"), work / f"{prefix}.pt"]
    def total(st: dict) -> int:  # a fine-tune's steps count from the start of the run it continued
        return int(st["step"]) + int(st.get("init_step", 0))

    steps = {total(torch.load(c, map_location="cpu", weights_only=True)): c for c in files if c.exists()}
    return {k: steps[k] for k in sorted(set(steps) - done)}


@torch.no_grad()
def sample_plausibility(backbone: Backbone, oracle, n: int = 32, *, num_steps: int = 50, seed: int = 0,
                        min_pixels: int = 4, batch_size: int = 32) -> dict:
    """Share of ``n`` unconditional samples in which the oracle finds every part of :data:`MAIN_PARTS`.

    Also the per-part hit rate. Samples: DDIM, ``num_steps`` steps, seeds ``seed .. seed + n - 1``.
    """
    from ..sampling import generate

    ids = torch.tensor([PARTS.index(p) + 1 for p in MAIN_PARTS])
    found = []
    for s in range(0, n, batch_size):
        imgs = generate(backbone, min(batch_size, n - s), num_steps=num_steps, guidance_scale=1.0, seed=seed + s)
        lab = oracle.predict_labels(imgs).cpu()
        area = torch.stack([(lab == int(c)).sum((1, 2)) for c in ids], 1)
        found.append(area >= min_pixels)
    hit = torch.cat(found).float()
    return {"all_found": float(hit.all(1).float().mean()), "n": n, "num_steps": num_steps,
            **{f"found_{p.replace(' ', '_')}": float(h) for p, h in zip(MAIN_PARTS, hit.mean(0))}}


def gate_pixel(work: Path, out: Path, cfg, *, n_probe: int = 20, n_samples: int = 32, seed: int = 0,
               timesteps: tuple[int, ...] = (25, 50, 150), oracle_dir: Path | None = None) -> dict:
    """Measure every pixel-DDPM checkpoint in ``work`` against the pipeline in ``out`` (see module doc)."""
    from ..loading import load_backbone, untrained_like
    from ..registry import DATA_DIR
    from .oracle import OracleSegmenter
    from .quality import GATE_START, backbone_from_checkpoint, fewshot_probe, fewshot_probe_rgb

    protocol = {"n_probe": n_probe, "n_samples": n_samples, "seed": seed, "timesteps": list(timesteps),
                "place": "best ridge probe on validation images", "main_parts": list(MAIN_PARTS),
                "scored_on": f"validation images (fewshot_test {GATE_START}+)"}
    path = out / "gates.json"
    rec = open_record(path, protocol)
    base = load_backbone(str(out), device="cpu")
    oracle = OracleSegmenter.load(oracle_dir or DATA_DIR / "oracle-faces")
    probe_kw = dict(n_train=n_probe, n_test=n_probe, n_val=n_probe, seed=seed, world="faces", timesteps=timesteps,
                    test_start=GATE_START)
    if "untrained" not in rec:
        rec["untrained"] = fewshot_probe(untrained_like(base, seed=seed), **probe_kw).as_dict()
        rgb_kw = dict(n_train=n_probe, n_test=n_probe, seed=seed, world="faces", size=base.resolution,
                      test_start=GATE_START)
        rec["rgb"] = fewshot_probe_rgb(**rgb_kw).as_dict()
        rec["rgbxy"] = fewshot_probe_rgb(**rgb_kw, position=True).as_dict()
        path.write_text(json.dumps(rec, indent=1))
    for step, ckpt in tqdm(unmeasured_checkpoints(work, "ddpm", rec).items(), desc="gate"):
        t0 = time.time()
        bb = backbone_from_checkpoint(base, ckpt)
        plaus = sample_plausibility(bb, oracle, n=n_samples, seed=seed)
        probe = fewshot_probe(bb, **probe_kw).as_dict()
        rec["checkpoints"].append({"step": step, **{f"samples_{k}": v for k, v in plaus.items()},
                                   **{f"probe_{k}": v for k, v in probe.items()}, "seconds": round(time.time() - t0, 1)})
        rec["checkpoints"].sort(key=lambda r: r["step"])
        path.write_text(json.dumps(rec, indent=1))
    path.write_text(json.dumps(rec, indent=1))
    return rec
