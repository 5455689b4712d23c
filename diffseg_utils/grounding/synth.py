"""Synthesise a grounding dataset from the command line, on one or many processes.

One process (the toy's class splits and oracle labeler come from its grounding defaults)::

    python -m diffseg_utils.grounding.synth --backbone toy --defaults diffseg_utils.toy.grounding_defaults:TOY \\
        --out results/grounding-data --num-samples 1000 --shard-size 64 --classes seen --labeler oracle

Several (each process writes the shards ``k`` with ``k % num_processes == rank``; the data
does not depend on the process count)::

    accelerate launch --multi_gpu --num_processes 2 -m diffseg_utils.grounding.synth --out ...

On a machine without GPUs use ``--multi_gpu`` too: this script then asks accelerate for CPU
processes (``PartialState(cpu=True)``, gloo). accelerate's own ``--cpu`` flag starts a single
process unless ``--mpirun_hostfile`` is given. With more than one process each one uses one
torch thread, so N processes share N cores instead of oversubscribing them.

Order of writes: rank 0 checks or writes ``manifest.json``, all ranks meet at a barrier, then
every rank writes its shards. A rank that fails prints ``[rank r/N] FAILED: ...`` and its
traceback to stderr (the launcher's own summary names the rank too). Rerunning the same command
resumes: finished shards are kept. After all processes finish, the main one checks the shards
and writes ``index.json``.

Labelers: ``grounding`` (a trained module, protocol II) plus those of the grounding defaults
(``--defaults``, else the backbone's ``grounding_defaults``); see :mod:`.defaults`.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .defaults import resolve_defaults
from .labelers import GroundingLabeler, Labeler
from .shards import synthesize, write_index


def grounding_labeler(args: argparse.Namespace, backbone) -> Labeler:
    """A trained grounding module labelling every prompted class from the UNet features (protocol II)."""
    from .module import GroundingModule

    if args.grounding_ckpt is None:
        raise ValueError("--labeler grounding needs --grounding-ckpt PATH (a module written by "
                         "`python -m diffseg_utils.grounding.train`)")
    module = GroundingModule.load(Path(args.grounding_ckpt), device=backbone.device)
    return GroundingLabeler(backbone, module, args.class_names)


LABELERS: dict[str, Callable[[argparse.Namespace, object], Labeler]] = {"grounding": grounding_labeler}
"""General labeler name -> factory(args, backbone); the grounding defaults' ``labelers`` add to these."""


def parse_classes(spec: str, defaults=None) -> list[str]:
    """A class-set name of the grounding defaults (e.g. the toy's ``seen`` / ``unseen`` / ``all``) or a
    comma-separated list of names."""
    sets = defaults.class_sets if defaults is not None else {}
    if spec in sets:
        return list(sets[spec])
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        raise ValueError(f"--classes {spec!r} names no class; use a comma-separated list"
                         + (f" or one of {sorted(sets)}" if sets else ""))
    if len(names) == 1 and not sets and spec in ("seen", "unseen", "all"):
        raise ValueError(f"--classes {spec} is a class set, but no grounding defaults define class sets; pass "
                         "--defaults (e.g. diffseg_utils.toy.grounding_defaults:TOY) or a comma-separated list")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Synthesise a Grounded Diffusion training set (resumable, multi-process "
                                            "with `accelerate launch`).")
    p.add_argument("--backbone", default="toy", help="registry name, local directory or hub id (default: toy)")
    p.add_argument("--defaults", default=None, help="GroundingDefaults with class sets, labelers, checkpoint (default: the "
                                                    "backbone's grounding_defaults), e.g. "
                                                    "diffseg_utils.toy.grounding_defaults:TOY")
    p.add_argument("--out", type=Path, required=True, help="output directory (shards, manifest.json, index.json)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--num-steps", type=int, default=50, help="DDIM steps (paper: 50)")
    p.add_argument("--guidance-scale", dest="guidance_scale", type=float, default=5.0,
                   help="classifier-free guidance scale (paper, training: 5.0)")
    p.add_argument("--feature-step", type=int, default=-1, help="DDIM step whose features are kept (-1 = last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images per generation call (does not change the data)")
    p.add_argument("--classes", default="seen", help="a class set of the grounding defaults or comma-separated names")
    p.add_argument("--template", default=None, help="prompt template (default: the backbone's); {} gets 'c1' or "
                                                    "'c1 and a c2'")
    p.add_argument("--two-prob", type=float, default=0.5, help="probability of a two-class prompt")
    p.add_argument("--labeler", default=None, help="labeler name (default: the defaults' default_labeler)")
    p.add_argument("--oracle", default=None, help="segmenter weights for the grounding defaults' labeler (its default "
                                                  "otherwise)")
    p.add_argument("--min-score", type=float, default=0.05, help="segmenter score below which a class is 'missed'")
    p.add_argument("--grounding-ckpt", type=Path, default=None,
                   help="trained grounding module (--labeler grounding; default: the defaults' checkpoint)")
    p.add_argument("--no-features", action="store_true", help="do not store UNet features (images + masks only)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(args: argparse.Namespace, state) -> None:
    from ..loading import load_backbone

    rank, world = state.process_index, state.num_processes
    device = torch.device("cpu") if args.use_cpu else state.device
    backbone = load_backbone(args.backbone, device=device)
    defaults = resolve_defaults(args.defaults, backbone)
    labelers = {**LABELERS, **(defaults.labelers if defaults is not None else {})}
    name = args.labeler or (defaults.default_labeler if defaults is not None else None)
    if name not in labelers:
        raise ValueError(f"--labeler {name!r} is not known; choose from {sorted(labelers)}"
                         + ("" if defaults is not None else " (or pass --defaults for dataset-specific labelers)"))
    args.class_names = parse_classes(args.classes, defaults)
    if args.grounding_ckpt is None and defaults is not None and defaults.checkpoint is not None:
        args.grounding_ckpt = Path(defaults.checkpoint)
    labeler = labelers[name](args, backbone)
    paths = synthesize(backbone, labeler, args.out, num_samples=args.num_samples, class_names=args.class_names,
                       shard_size=args.shard_size, seed=args.seed, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                       feature_step=args.feature_step, batch_size=args.batch_size,
                       keep_features=not args.no_features, template=args.template, two_prob=args.two_prob,
                       rank=rank, world_size=world, barrier=state.wait_for_everyone if world > 1 else None,
                       progress=not args.no_progress)
    print(f"[rank {rank}/{world}] {len(paths)} shards in {args.out}", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        index = write_index(args.out)
        n_lab, n_pr = sum(index["labelled_per_class"].values()), sum(index["prompted_per_class"].values())
        print(f"{index['num_samples']} samples in {index['num_shards']} shards; {n_lab}/{n_pr} prompted classes "
              f"labelled; index: {args.out / 'index.json'}", flush=True)
    state.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    from accelerate import PartialState

    args = build_parser().parse_args(argv)
    args.use_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    state = PartialState(cpu=args.use_cpu)
    rank, world = state.process_index, state.num_processes
    if world > 1:
        torch.set_num_threads(1)  # N processes on N cores: one thread each, no oversubscription
    try:
        _run(args, state)
    except BaseException as e:
        # the other ranks then fail at a barrier with a connection error: say which rank failed first, and why
        print(f"[rank {rank}/{world}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        raise
    finally:
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            try:
                state.destroy_process_group()
            except Exception:  # noqa: BLE001 -- a peer that already died; the original error is what matters
                pass


if __name__ == "__main__":
    main()
