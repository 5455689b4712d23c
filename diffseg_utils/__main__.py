"""Command line: ``python -m diffseg_utils reproduce`` runs every notebook headless, in order.

Executed notebooks go to ``results/notebooks/`` and the numbers they recorded to
``results/summary.md``. ``--notebooks 01 02`` runs a subset; ``--timeout`` bounds one cell.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .registry import REPO_ROOT
from .report import results_dir, summary_markdown


def notebooks(selected: list[str] | None = None) -> list[Path]:
    """The repo's notebooks in reading order (optionally those whose names start with ``selected``)."""
    nbs = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selected:
        nbs = [p for p in nbs if any(p.name.startswith(s) for s in selected)]
    return nbs


def reproduce(selected: list[str] | None = None, timeout: int = 1800) -> int:
    import nbformat
    from nbclient import NotebookClient

    out_dir = results_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    nbs = notebooks(selected)
    if not nbs:
        print("no notebooks yet (notebooks/NN_*.ipynb); nothing to run")
    sections = []
    for p in nbs:
        section = p.stem
        sections.append(section)
        metrics = results_dir() / "metrics" / f"{section}.json"
        if metrics.exists():
            metrics.unlink()
        os.environ["DIFFSEG_SECTION"] = section
        t0 = time.time()
        print(f"[{section}] running ...", flush=True)
        nb = nbformat.read(p, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(p.parent)}}).execute()
        nbformat.write(nb, out_dir / p.name)
        print(f"[{section}] done in {time.time() - t0:.0f} s -> {out_dir / p.name}", flush=True)
    (results_dir() / "summary.md").write_text(summary_markdown(sections))
    print(f"wrote {results_dir() / 'summary.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffseg_utils", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reproduce", help="execute every notebook in order and write results/summary.md")
    r.add_argument("--notebooks", nargs="*", help="prefixes of the notebooks to run, e.g. 00 01")
    r.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    sub.add_parser("list", help="list the known backbones")
    a = ap.parse_args(argv)
    if a.cmd == "reproduce":
        return reproduce(a.notebooks, a.timeout)
    from .registry import list_backbones

    for k, v in list_backbones().items():
        print(f"{k:16s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
