"""Key numbers a notebook computed, collected for ``results/summary.md``.

A notebook calls ``record("vae_psnr_db", psnr, target=">= 28")``; the value lands in
``results/metrics/<section>.json`` (``section`` defaults to the running notebook's name as set
by ``python -m diffseg_utils reproduce``), and the reproduce command turns all of them into a
markdown table. Nothing is written unless the code computed it in this run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .registry import REPO_ROOT


def results_dir() -> Path:
    """Where executed notebooks and metrics go (``$DIFFSEG_RESULTS`` or ``<repo>/results``)."""
    return Path(os.environ.get("DIFFSEG_RESULTS", REPO_ROOT / "results"))


def record(key: str, value, *, target: str | None = None, section: str | None = None, note: str = "") -> None:
    """Store one computed number (or short string) under ``section``."""
    section = section or os.environ.get("DIFFSEG_SECTION", "interactive")
    d = results_dir() / "metrics"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{section}.json"
    data = json.loads(f.read_text()) if f.exists() else {}
    if hasattr(value, "item"):
        value = value.item()
    data[key] = {"value": value, "target": target, "note": note}
    f.write_text(json.dumps(data, indent=1))


def summary_markdown(sections: list[str]) -> str:
    """A markdown report of the recorded metrics of the given sections, in order."""
    lines = ["# Results", "", "Numbers computed by the notebooks in this run (`python -m diffseg_utils reproduce`).", ""]
    for s in sections:
        f = results_dir() / "metrics" / f"{s}.json"
        lines.append(f"## {s}")
        lines.append("")
        if not f.exists():
            lines += ["(no metrics recorded)", ""]
            continue
        lines += ["| metric | value | target | note |", "|---|---|---|---|"]
        for k, v in json.loads(f.read_text()).items():
            val = v["value"]
            val = f"{val:.4g}" if isinstance(val, float) else str(val)
            lines.append(f"| {k} | {val} | {v.get('target') or ''} | {v.get('note') or ''} |")
        lines.append("")
    return "\n".join(lines)
