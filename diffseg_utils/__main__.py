"""Command line.

``python -m diffseg_utils reproduce`` runs the notebooks headless, in order, with papermill. The
parameters cell of each notebook (tagged ``parameters``) receives ``--backbone`` / ``--dataset`` /
``--set KEY=VALUE``; executed notebooks go to ``results/<run>/notebooks/`` and the numbers they
recorded to ``results/<run>/summary.md``, where ``<run>`` is the backbone's name (``toy`` when none
is given)::

    python -m diffseg_utils reproduce                                           # every notebook, toy model
    python -m diffseg_utils reproduce --backbone toy-faces-ddpm --dataset toy-faces --notebooks 01,02
    python -m diffseg_utils list                                                # known backbones and datasets
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import re
import os
import sys
import time
import warnings
from pathlib import Path

from .registry import REPO_ROOT
from .report import run_name, summary_markdown


def notebooks(selected: list[str] | None = None) -> list[Path]:
    """The repo's notebooks in reading order (optionally those whose names start with ``selected``)."""
    nbs = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selected:
        nbs = [p for p in nbs if any(p.name.startswith(s) for s in selected)]
    return nbs


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v  # a bare string
    return out


@contextlib.contextmanager
def _quiet_kernel_stderr():
    """The kernel process inherits file descriptor 2 and prints its own log there (e.g. ipykernel's notice
    that a loopback kernel runs over TCP without encryption). Point fd 2 at /dev/null for the kernel
    while this process keeps writing its progress bar to the real stderr. A failing cell still raises
    here, with its traceback, through papermill."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. inside some notebook frontends)
        yield
        return
    old_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.close()
        sys.stderr = old_stderr
        os.close(saved)
        os.close(devnull)


_PROGRESS = re.compile(r"\d+%\|")


def clean_outputs(path: Path) -> None:
    """Drop what only made sense while a notebook ran: progress-bar widgets and progress lines on
    stderr (saved, they read "0%"), papermill's per-cell timing metadata, and empty streams."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        keep = []
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data and _PROGRESS.search(data.get("text/plain", "")):
                continue
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                lines = [ln for ln in o["text"].splitlines(keepends=True) if not _PROGRESS.search(ln)]
                if not "".join(lines).strip():
                    continue
                o["text"] = "".join(lines)
            keep.append(o)
        cell.outputs = keep
    nb.metadata.pop("papermill", None)
    nbformat.write(nb, path)


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for the duration of the block (the kernels inherit them); restore after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# A headless shell's MPLBACKEND=Agg would leave every executed notebook without its figures.
NOTEBOOK_PLOT_BACKEND = "module://matplotlib_inline.backend_inline"


def reproduce(selected: list[str] | None = None, *, backbone: str | None = None, dataset: str | None = None,
              params: dict | None = None, timeout: int = 1800, results: Path | None = None,
              progress: bool = True, out_dir: Path | None = None) -> Path:
    """Execute notebooks with injected parameters; returns the run's results folder.

    Executed notebooks go to ``<results>/<run>/notebooks/`` (``out_dir`` instead, e.g. the
    ``notebooks/`` folder itself to refresh the committed outputs), recorded numbers to
    ``<results>/<run>/metrics/`` and ``summary.md``.
    """
    import papermill as pm

    params = dict(params or {})
    if backbone:
        params["BACKBONE"] = backbone
    if dataset:
        params["DATASET"] = dataset
    root = Path(results or os.environ.get("DIFFSEG_RESULTS_ROOT", REPO_ROOT / "results")) / run_name(backbone, dataset)
    out_dir = Path(out_dir) if out_dir is not None else root / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    nbs = notebooks(selected)
    if not nbs:
        raise SystemExit(f"no notebooks match {selected}; available: {[p.stem for p in notebooks()]}")
    sections = []
    t_all = time.time()
    for i, p in enumerate(nbs, 1):
        section = p.stem
        sections.append(section)
        metrics = root / "metrics" / f"{section}.json"
        if metrics.exists():
            metrics.unlink()
        print(f"[{i}/{len(nbs)}] {section} ({', '.join(f'{k}={v!r}' for k, v in params.items()) or 'defaults'})",
              flush=True)
        t0 = time.time()
        with warnings.catch_warnings(), _quiet_kernel_stderr(), _environ(
                MPLBACKEND=NOTEBOOK_PLOT_BACKEND, DIFFSEG_RESULTS=str(root), DIFFSEG_SECTION=section):
            warnings.simplefilter("ignore")
            pm.execute_notebook(str(p), str(out_dir / p.name), parameters=params, cwd=str(p.parent),
                                kernel_name="python3", progress_bar=progress, execution_timeout=timeout,
                                log_output=False, report_mode=False)
        clean_outputs(out_dir / p.name)
        print(f"    done in {time.time() - t0:.0f} s -> {out_dir / p.name}", flush=True)
    summary = root / "summary.md"
    summary.write_text(summary_markdown(sections, title=f"backbone {backbone or 'toy'}, dataset {dataset or 'default'}",
                                          root=root))
    print(f"all {len(nbs)} notebooks in {time.time() - t_all:.0f} s; wrote {summary}")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffseg_utils", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reproduce", help="execute the notebooks in order and write results/<run>/summary.md")
    r.add_argument("--notebooks", default="", help="comma-separated prefixes of the notebooks to run, e.g. 01,02")
    r.add_argument("--backbone", help="injected as BACKBONE (a short name, hub id, local directory or ADM .pt)")
    r.add_argument("--dataset", help="injected as DATASET (a registered name or a folder)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more parameters to inject, e.g. --set N_TRAIN=10 SEED=1")
    r.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    r.add_argument("--results", type=Path, help="results root (default: <repo>/results)")
    r.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    r.add_argument("--out-dir", type=Path, help="write the executed notebooks here (e.g. notebooks/ to refresh them)")
    sub.add_parser("list", help="list the known backbones and datasets")
    a = ap.parse_args(argv)
    if a.cmd == "reproduce":
        sel = [s for s in a.notebooks.replace(" ", ",").split(",") if s]
        reproduce(sel or None, backbone=a.backbone, dataset=a.dataset, params=_parse_set(a.set), timeout=a.timeout,
                  results=a.results, progress=not a.no_progress, out_dir=a.out_dir)
        return 0
    from .registry import list_backbones

    print("backbones:")
    for k, v in list_backbones().items():
        print(f"  {k:16s} {v}")
    try:
        from .datasets import list_datasets
    except ImportError:
        return 0
    print("datasets:")
    for k, v in list_datasets().items():
        print(f"  {k:16s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
