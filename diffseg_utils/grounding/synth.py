"""Synthesise a grounding dataset from the command line, on one or many processes.

One process::

    python -m diffseg_utils.grounding.synth --backbone toy --out results/grounding-data \\
        --num-samples 1000 --shard-size 64 --classes seen --labeler oracle

Several (each process writes the shards ``k`` with ``k % num_processes == rank``; the data
does not depend on the process count)::

    accelerate launch --multi_gpu --num_processes 2 -m diffseg_utils.grounding.synth --out ...

On a machine without GPUs use ``--multi_gpu`` too: this script then asks accelerate for CPU
processes (``PartialState(cpu=True)``, gloo). accelerate's own ``--cpu`` flag starts a single
process unless ``--mpirun_hostfile`` is given. With more than one process each one uses one
torch thread, so N processes share N cores instead of oversubscribing them.

Rerunning the same command resumes: finished shards are kept. After all processes finish,
the main one checks the shards and writes ``index.json``. Labelers come from :data:`LABELERS`
(name -> factory taking the parsed arguments and the loaded backbone).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from ..registry import DATA_DIR
from ..toy.world import CATEGORIES, SEEN_CATEGORIES, UNSEEN_CATEGORIES
from .data import DEFAULT_TEMPLATE, Labeler, SegmenterLabeler, synthesize, write_index

CLASS_SETS: dict[str, tuple[str, ...]] = {"seen": SEEN_CATEGORIES, "unseen": UNSEEN_CATEGORIES, "all": CATEGORIES}


def oracle_labeler(args: argparse.Namespace, backbone) -> Labeler:
    """The toy world's oracle segmenter (our Mask R-CNN)."""
    from ..toy.oracle import OracleSegmenter

    path = Path(args.oracle)
    seg = OracleSegmenter.load(path.parent if path.is_file() else path, device=backbone.device)
    return SegmenterLabeler(seg, min_score=args.min_score, name="oracle")


def grounding_labeler(args: argparse.Namespace, backbone) -> Labeler:
    """A trained grounding module labelling every prompted class from the UNet features (protocol II)."""
    from .module import GroundingModule
    from .protocols import GroundingLabeler

    path = Path(args.grounding_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"no grounding checkpoint at {path}; pass --grounding-ckpt PATH (the toy's is "
                                f"{DATA_DIR / 'grounding' / 'grounding.pt'}) or train one with "
                                "`python -m diffseg_utils.grounding.train`")
    module = GroundingModule.load(path, map_location=backbone.device)
    return GroundingLabeler(backbone, module, parse_classes(args.classes))


LABELERS: dict[str, Callable[[argparse.Namespace, object], Labeler]] = {
    "oracle": oracle_labeler,
    "grounding": grounding_labeler,
}
"""Labeler name -> factory(args, backbone). Add an entry to offer another ``--labeler``."""


def parse_classes(spec: str) -> list[str]:
    """``seen`` / ``unseen`` / ``all`` (the toy world's splits) or a comma-separated list of names."""
    if spec in CLASS_SETS:
        return list(CLASS_SETS[spec])
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r} names no class; use seen, unseen, all or a comma-separated list")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Synthesise a Grounded Diffusion training set (resumable, multi-process "
                                            "with `accelerate launch`).")
    p.add_argument("--backbone", default="toy", help="registry name, local directory or hub id (default: toy)")
    p.add_argument("--out", type=Path, required=True, help="output directory (shards, manifest.json, index.json)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps (paper: 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (paper, training: 5.0)")
    p.add_argument("--feature-step", type=int, default=-1, help="DDIM step whose features are kept (-1 = last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per generation call (does not change the data)")
    p.add_argument("--classes", default="seen", help="seen | unseen | all | comma-separated class names")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template; {} gets 'c1' or 'c1 and a c2'")
    p.add_argument("--two-prob", type=float, default=0.5, help="probability of a two-class prompt")
    p.add_argument("--labeler", default="oracle", choices=sorted(LABELERS))
    p.add_argument("--oracle", default=str(DATA_DIR / "oracle"), help="oracle directory or its oracle.pt")
    p.add_argument("--min-score", type=float, default=0.05, help="segmenter score below which a class is 'missed'")
    p.add_argument("--grounding-ckpt", type=Path, default=DATA_DIR / "grounding" / "grounding.pt", help="trained grounding module (--labeler grounding)")
    p.add_argument("--no-features", action="store_true", help="do not store UNet features (images + masks only)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    from accelerate import PartialState

    from ..backbones import load_backbone

    args = build_parser().parse_args(argv)
    use_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    state = PartialState(cpu=use_cpu)
    rank, world = state.process_index, state.num_processes
    if world > 1:
        torch.set_num_threads(1)  # N processes on N cores: one thread each, no oversubscription
    device = torch.device("cpu") if use_cpu else state.device
    backbone = load_backbone(args.backbone, device=device)
    labeler = LABELERS[args.labeler](args, backbone)
    paths = synthesize(backbone, labeler, args.out, num_samples=args.num_samples,
                       class_names=parse_classes(args.classes), shard_size=args.shard_size, seed=args.seed,
                       num_steps=args.num_steps, guidance=args.guidance, feature_step=args.feature_step,
                       batch_size=args.batch_size, keep_features=not args.no_features, template=args.template,
                       two_prob=args.two_prob, rank=rank, world_size=world,
                       progress=not args.no_progress)
    print(f"[rank {rank}/{world}] {len(paths)} shards in {args.out}", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        index = write_index(args.out)
        n_lab, n_pr = sum(index["labelled_per_class"].values()), sum(index["prompted_per_class"].values())
        print(f"{index['num_samples']} samples in {index['num_shards']} shards; {n_lab}/{n_pr} prompted classes "
              f"labelled; index: {args.out / 'index.json'}", flush=True)
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main()
