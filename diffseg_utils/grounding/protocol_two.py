"""Protocol II over training-set sizes: does the grounded generator's synthetic data train a segmenter?

    python -m diffseg_utils.grounding.protocol_two --backbone toy --sizes 250 500 1000 2000 \\
        --out data/grounding/protocol_two --keep 2000

Three training sets of each size, one segmenter architecture, budget and seed (the backbone's grounding defaults
name the network, its settings, the labelled test images and the labelled seen-class images):

* ``grounded``: generations of prompts naming any class, labelled by the grounding module, unseen classes
  included (the paper's synthetic data set);
* ``segmenter_seen``: the *same* generations labelled by the segmenter that labels the module's training data,
  allowed to name only the seen classes (the ablation: without the grounding module an unseen object reads as
  background, so its unseen score is the floor the module must beat);
* ``truth_seen``: labelled real images of seen classes (the reference: how well this segmenter learns the world
  from that many images).

Each is scored on the defaults' protocol II test images (every class): seen / unseen / harmonic mIoU and per
class. :func:`protocol_two_curve` returns the table; the CLI writes it to ``results.json`` and the segmenters of
the ``--keep`` sizes as safetensors (:func:`save_segmenter`, read back by :func:`load_segmenters`), so a notebook
scores them without training. A sample's prompt and noise depend only on its index, so the first ``n``
generations of the largest set are exactly an ``n``-image synthesis.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .defaults import GroundingDefaults, resolve_defaults
from .labelers import GroundingLabeler, SegmenterLabeler, weights_fingerprint
from .protocols import evaluate_segmenter, fit_segmenter
from .shards import GroundingShards, synthesize

SOURCES = {"grounded": "synthetic, grounding module labels (all classes)",
           "segmenter_seen": "synthetic, segmenter labels (seen classes only)",
           "truth_seen": "ground truth (seen classes only)"}
"""The training sets of the curve: key -> what a table calls it."""

__all__ = ["SOURCES", "protocol_two_curve", "save_segmenter", "load_segmenters", "synthetic_sets"]


def _need(defaults: GroundingDefaults, *fields: str) -> None:
    missing = [f for f in fields if getattr(defaults, f) is None]
    if missing:
        raise ValueError(f"protocol II needs the grounding defaults' {', '.join(missing)}; set them in your "
                         "GroundingDefaults (see diffseg_utils.toy.grounding_defaults for an example)")


def synthetic_sets(backbone, defaults: GroundingDefaults, module, work: str | Path, num_samples: int, *,
                   seed: int = 20_000, num_steps: int = 20, guidance_scale: float = 5.0,
                   progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The two synthetic training sets of ``num_samples`` generations (prompts over every class, ``seed`` on):
    ``{"grounded": (images, labels), "segmenter_seen": (images, labels)}``, images (N, 3, H, W) uint8, labels
    (N, H, W) int64 (0 = background, ``k`` = ``class_sets["all"][k - 1]``). Synthesised into ``work`` (resumable;
    a folder per labeler and module weights, so a changed module is never read from an old folder)."""
    classes, seen = tuple(defaults.class_sets["all"]), tuple(defaults.class_sets["seen"])
    labelers = {"grounded": GroundingLabeler(backbone, module, classes),
                "segmenter_seen": SegmenterLabeler(defaults.segmenter(backbone.device), classes=seen)}
    out = {}
    for key, labeler in labelers.items():
        d = Path(work) / f"{key}_{num_samples}_{seed}_{weights_fingerprint(module) if key == 'grounded' else 'seg'}"
        synthesize(backbone, labeler, d, num_samples=num_samples, class_names=classes, shard_size=64,
                   num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, keep_features=False,
                   progress=progress)
        shards = GroundingShards(d, features=False)
        out[key] = (shards.images, shards.index_masks())
    return out


def protocol_two_curve(backbone, defaults: GroundingDefaults, module, *, sizes: Sequence[int], work: str | Path,
                       n_test: int = 500, settings: dict | None = None, seed: int = 0, num_steps: int = 20,
                       guidance_scale: float = 5.0, ablation_sizes: Sequence[int] | None = None,
                       progress: bool = True) -> tuple[dict, dict]:
    """Train protocol II's segmenter on the first ``n`` images of each training set (:data:`SOURCES`) for each ``n``
    in ``sizes`` and score it on ``n_test`` labelled test images; the seen-only ablation only at ``ablation_sizes``
    (default: the largest size; it is a floor, not a curve).

    ``settings``: :func:`~.protocols.fit_segmenter` keywords (default: the defaults' ``segmenter_settings``);
    generations start at seed ``20_000 + seed`` (notebook 04's). Returns ``(results, nets)``: ``results[source][n]``
    = :func:`~.protocols.evaluate_segmenter`'s dict plus ``seconds``; ``nets[(source, n)]`` the trained segmenters.
    """
    _need(defaults, "segmenter_net", "protocol_two_test_set", "ground_truth_seen_dataset")
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive image counts, got {sizes}")
    settings = dict(settings if settings is not None else defaults.segmenter_settings)
    classes, seen = tuple(defaults.class_sets["all"]), tuple(defaults.class_sets["seen"])
    k = len(classes) + 1
    data = synthetic_sets(backbone, defaults, module, work, sizes[-1], seed=20_000 + seed, num_steps=num_steps,
                          guidance_scale=guidance_scale, progress=progress)
    data["truth_seen"] = defaults.ground_truth_seen_dataset(sizes[-1], seen, classes)
    test_x, test_y = defaults.protocol_two_test_set(n_test, classes)
    ablation = set(sizes[-1:] if ablation_sizes is None else ablation_sizes)
    results, nets = {s: {} for s in SOURCES}, {}
    for n in sizes:
        for source in SOURCES:
            if source == "segmenter_seen" and n not in ablation:
                continue
            x, y = data[source]
            t0 = time.time()
            net = fit_segmenter(x[:n], y[:n], k, net=defaults.segmenter_net(k, seed=seed), seed=seed,
                                device=backbone.device, progress=progress, **settings)
            results[source][n] = {**evaluate_segmenter(net, test_x, test_y, classes, seen),
                                  "seconds": round(time.time() - t0, 1)}
            nets[(source, n)] = net
            if progress:
                r = results[source][n]
                print(f"{source:15s} n={n:5d}: seen {r['seen']:.3f} unseen {r['unseen']:.3f} ({r['seconds']:.0f} s)",
                      flush=True)
    return results, nets


def save_segmenter(net: torch.nn.Module, path: str | Path) -> None:
    """Write a segmenter's weights as safetensors (tensors only: loading runs no code)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))


def load_segmenters(folder: str | Path, defaults: GroundingDefaults, *, device: torch.device | str = "cpu",
                    seed: int = 0) -> tuple[dict, dict]:
    """Read a ``protocol_two`` output folder: ``(results, nets)`` as :func:`protocol_two_curve` returns them, with
    ``nets`` holding the kept segmenters (``defaults.segmenter_net`` filled with the saved weights, eval mode)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    f = folder / "results.json"
    if not f.exists():
        raise FileNotFoundError(f"no protocol II results at {f}; make them with `python -m "
                                f"diffseg_utils.grounding.protocol_two --out {folder}`")
    meta = json.loads(f.read_text())
    _need(defaults, "segmenter_net")
    results = {s: {int(n): r for n, r in v.items()} for s, v in meta["results"].items()}
    k = len(defaults.class_sets["all"]) + 1
    nets = {}
    for source, n in ((s, int(n)) for s, n in meta["kept"]):
        net = defaults.segmenter_net(k, seed=seed)
        net.load_state_dict(load_file(str(folder / f"{source}_{n}.safetensors")))
        nets[(source, n)] = net.to(device).eval()
    return results, nets


def main(argv: list[str] | None = None) -> None:
    from ..loading import load_backbone
    from .module import GroundingModule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="toy")
    p.add_argument("--defaults", default=None, help="GroundingDefaults 'package.module:NAME' (default: the backbone's)")
    p.add_argument("--grounding-ckpt", type=Path, default=None, help="the grounding module (default: the defaults')")
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    p.add_argument("--keep", type=int, nargs="*", default=None, help="sizes whose segmenters are saved (default: largest)")
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--work", type=Path, default=None, help="synthetic sets (default: <out>/work, not for git)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    bb = load_backbone(a.backbone, device=a.device)
    defaults = resolve_defaults(a.defaults, bb)
    if defaults is None:
        raise SystemExit(f"{a.backbone} has no grounding defaults: pass --defaults package.module:NAME")
    module = GroundingModule.load(a.grounding_ckpt or defaults.checkpoint, device=bb)
    settings = dict(defaults.segmenter_settings)
    t0 = time.time()
    results, nets = protocol_two_curve(bb, defaults, module, sizes=a.sizes, work=a.work or a.out / "work",
                                       n_test=a.n_test, settings=settings, seed=a.seed, num_steps=a.num_steps,
                                       guidance_scale=a.guidance_scale)
    keep = sorted(set(a.keep if a.keep is not None else [max(a.sizes)]))
    a.out.mkdir(parents=True, exist_ok=True)
    for (source, n), net in nets.items():
        if n in keep:
            save_segmenter(net, a.out / f"{source}_{n}.safetensors")
    meta = {"backbone": a.backbone, "grounding_module": weights_fingerprint(module), "sizes": sorted(set(a.sizes)),
            "n_test": a.n_test, "seed": a.seed, "num_steps": a.num_steps, "guidance_scale": a.guidance_scale,
            "settings": settings, "threads": torch.get_num_threads(), "device": str(bb.device),
            "wall_seconds": round(time.time() - t0), "kept": [[s, n] for s, n in nets if n in keep],
            "sources": SOURCES, "results": results}
    (a.out / "results.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {a.out / 'results.json'} and {len(meta['kept'])} segmenters in {meta['wall_seconds']} s")


if __name__ == "__main__":
    main()
