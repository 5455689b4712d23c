"""Batched training of the grounding module on cached generations, and its CLI.

The paper trains at batch size 1 on images generated online (one image, one step). We cache
generations to shards once (:func:`~diffseg_utils.grounding.shards.synthesize`) and train on
mini-batches of (image, prompted class) pairs: the same loss, many times fewer wall-seconds.
Shards are read lazily (only each batch's rows), so the feature store may exceed RAM.

    python -m diffseg_utils.grounding.train --shards results/grounding/train --out data/grounding \\
        --defaults diffseg_utils.toy.grounding_defaults:TOY
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from .defaults import resolve_defaults
from .module import GroundingConfig, GroundingModule, bce_loss, class_embeddings
from .prompts import prompt_template
from .shards import GroundingShards


def train_grounding(
    module: GroundingModule,
    shards: GroundingShards,
    queries: torch.Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 50,
) -> list[dict]:
    """Train ``module`` in place on cached (features, segmenter masks) and return the loss history.

    queries: (num_classes, text_dim) class text embeddings, indexed by the shards' class ids.
    lr:      default ``module.config.lr`` (the paper's Adam 1e-5 for SD; our toy config uses more).
    Pairs whose class the segmenter missed (``valid`` False) contribute no loss (no zero masks).
    History: every ``log_every`` steps and at the end, the loss's exponential moving average
    (0.95). The average stays on the device; the host reads it only at those steps (one sync per
    ``log_every`` steps, none in between).
    """
    n = len(shards)
    if n == 0:
        raise ValueError("the shards hold no samples; run the synthesis first")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if not shards.resolutions:
        raise ValueError(f"{shards.out_dir} holds no features (synthesised with keep_features=False / --no-features); "
                         "synthesise the training set with features")
    ids = shards.class_ids
    if int(ids.max()) >= queries.shape[0]:
        raise ValueError(f"shards use class id {int(ids.max())} but only {queries.shape[0]} class queries were given")
    dev = next(module.parameters()).device
    queries = queries.to(dev)
    opt = torch.optim.Adam(module.parameters(), lr=lr if lr is not None else module.config.lr)
    g = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    run = None
    module.train()
    bar = tqdm(range(steps), desc="grounding", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (batch_size,), generator=g)
        b = shards.batch(idx, device=dev)
        cid = b["class_ids"]
        logits = module(b["features"], queries[cid.clamp_min(0)])           # (B, M, H, W)
        loss = bce_loss(logits, b["masks"], b["valid"] & (cid >= 0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        run = loss if run is None else 0.95 * run + 0.05 * loss
        if (step + 1) % log_every == 0 or step + 1 == steps:
            value = run.item()  # the only host sync: once per log_every steps
            history.append({"step": step + 1, "loss": value})
            bar.set_postfix(loss=f"{value:.4f}")
    module.eval()
    return history


def main(argv: list[str] | None = None) -> None:
    from .. import load_backbone

    p = argparse.ArgumentParser(description="Train the grounding module on synthesised shards.")
    p.add_argument("--backbone", default="toy")
    p.add_argument("--defaults", default=None, help="GroundingDefaults (module config, provenance), 'package.module:NAME'; default: the "
                                                    "backbone's grounding_defaults")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--config", choices=["paper", "defaults"], default="defaults",
                   help="paper: the paper's sizes; defaults: the grounding defaults' module_config() (else paper)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    bb: Backbone = load_backbone(a.backbone)
    defaults = resolve_defaults(a.defaults, bb)
    shards = GroundingShards(a.shards)
    template = prompt_template(bb)
    if shards.manifest.get("template") != template:
        raise ValueError(f"{a.shards} was synthesised with the prompt template {shards.manifest.get('template')!r}, "
                         f"but {a.backbone} prompts with {template!r}: synthesise the data again with the backbone's "
                         "template (python -m diffseg_utils.grounding.synth ...)")
    make_cfg = defaults.module_config if defaults is not None else None
    cfg = make_cfg() if a.config == "defaults" and make_cfg is not None else GroundingConfig()
    module = GroundingModule.for_backbone(bb, cfg_batch=shards.manifest["guidance"] != 1.0, config=cfg)
    queries = class_embeddings(bb, shards.class_names, module.config.template)
    t0 = time.time()
    hist = train_grounding(module, shards, queries, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                           log_every=a.log_every)
    a.out.mkdir(parents=True, exist_ok=True)
    module.save(a.out / "grounding.pt")
    meta = {"backbone": a.backbone, "shards": str(a.shards), "num_samples": len(shards), "steps": a.steps,
            "batch_size": a.batch_size, "lr": a.lr or module.config.lr, "config": asdict(module.config),
            "template": module.config.template, "seed": a.seed, "class_names": list(shards.class_names),
            "wall_seconds": round(time.time() - t0, 1), "history": hist}
    prov = defaults.provenance if defaults is not None else None
    if prov is not None:
        meta.update(prov(bb))
    (a.out / "grounding.json").write_text(json.dumps(meta, indent=1))
    print(f"saved {a.out / 'grounding.pt'}; final loss {hist[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
