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


def record(key: str, value, *, target: str | None = None, section: str | None = None, note: str = "",
           baseline: str | None = None, paper: str | None = None, meaning: str = "") -> None:
    """Store one computed number (or short string) under ``section``.

    What the number is read against goes beside it in the summary: ``baseline`` names another key
    recorded in the same section (its value is shown, e.g. the raw-RGB floor measured in the same
    run), ``paper`` the published figure, ``target`` the repo's goal; ``meaning`` says in a few
    words what the number measures.
    """
    section = section or os.environ.get("DIFFSEG_SECTION", "interactive")
    d = results_dir() / "metrics"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{section}.json"
    data = json.loads(f.read_text()) if f.exists() else {}
    if hasattr(value, "item"):
        value = value.item()
    data[key] = {"value": value, "target": target, "note": note, "baseline": baseline, "paper": paper,
                 "meaning": meaning}
    f.write_text(json.dumps(data, indent=1))


def _fmt(val) -> str:
    return f"{val:.4g}" if isinstance(val, float) else str(val)


def summary_markdown(sections: list[str], title: str = "", root: Path | None = None) -> str:
    """A markdown report of the recorded metrics of the given sections, in order (from ``root``, default
    :func:`results_dir`)."""
    root = Path(root) if root is not None else results_dir()
    lines = [f"# Results{': ' + title if title else ''}", "",
             "Numbers computed by the notebooks in this run (`python -m diffseg_utils reproduce`), each beside what "
             "it is read against: a baseline measured in the same run, the paper's figure, or the repo's target.", ""]
    for s in sections:
        f = root / "metrics" / f"{s}.json"
        lines.append(f"## {s}")
        lines.append("")
        if not f.exists():
            lines += ["(no metrics recorded)", ""]
            continue
        lines += ["| metric | value | read against | meaning |", "|---|---|---|---|"]
        data = json.loads(f.read_text())
        for k, v in data.items():
            against = []
            if v.get("baseline"):
                b = data.get(v["baseline"])
                against.append(f"{v['baseline']} = {_fmt(b['value'])}" if b else f"{v['baseline']} (not recorded)")
            if v.get("paper"):
                against.append(f"paper: {v['paper']}")
            if v.get("target"):
                against.append(f"target {v['target']}")
            meaning = "; ".join(x for x in (v.get("meaning"), v.get("note")) if x)
            lines.append(f"| {k} | {_fmt(v['value'])} | {'; '.join(against)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


EXPECTED_FILE = REPO_ROOT / "notebooks" / "expected.json"
"""Committed expected numbers per notebook and run (backbone + dataset), with tolerances and why."""


def run_name(backbone: str | None, dataset: str | None) -> str:
    """The name of a (backbone, dataset) run: results go to ``results/<run>/``, expected numbers are
    keyed by it. The backbone's short name (or the last part of its path), plus the dataset's."""
    import re

    name = Path(str(backbone)).name if backbone else "toy"
    if dataset:
        name += "__" + Path(str(dataset)).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def check_expected(notebook: str, run: str, values: dict[str, float], *, params: dict | None = None,
                   tol: float | dict[str, float] | None = None, why: str | dict[str, str] = "",
                   path: str | Path | None = None, strict: bool = True) -> dict[str, bool]:
    """Compare a notebook's computed numbers with the committed expected ones; print one line each.

    ``path`` (default :data:`EXPECTED_FILE`) holds ``{notebook: {run: [{"params": {...}, "values":
    {name: {"value", "tol", "why"}}}, ...]}}``: per (backbone, dataset) run, one entry per parameter
    set that was measured. Prints ``name: ok`` when ``|value - expected| <= tol``, else the
    difference. A run with no committed numbers for these ``params`` (another backbone, dataset or
    setting) says so and checks nothing. ``strict`` raises ``AssertionError`` on any mismatch, so a
    headless run fails loudly.

    ``tol`` / ``why``: one tolerance and reason for every number, or a dict per name. The notebook is
    their one source: with the environment variable ``DIFFSEG_RECORD_EXPECTED=1`` the numbers are
    *recorded* with them (how the committed values are made, from a reviewed run), and a check whose
    ``tol`` differs from the recorded one fails ("record again"), so the two cannot drift apart
    (``tol=None`` checks with the recorded tolerances). The lines record mode prints are those a
    rerun reproducing the numbers prints, so a notebook executed once in record mode carries the
    output nbval compares later runs with.
    """
    f = Path(path or EXPECTED_FILE)
    norm = lambda d: json.loads(json.dumps(d, sort_keys=True, default=str))  # noqa: E731
    per = lambda x, k: x.get(k) if isinstance(x, dict) else x  # noqa: E731
    if os.environ.get("DIFFSEG_RECORD_EXPECTED") == "1":
        import fcntl

        missing = [k for k in values if per(tol, k) is None]
        if missing:
            raise ValueError(f"record mode needs a tolerance for {missing}: pass tol= (a number or a dict per name)")
        new = {"params": norm(params), "values": {k: {"value": float(v), "tol": float(per(tol, k)),
                                                      "why": per(why, k) or ""} for k, v in values.items()}}
        with open(f.with_suffix(".lock"), "w") as lock:  # several notebooks may record at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(f.read_text()) if f.exists() else {}
            entries = data.get(notebook, {}).get(run, [])
            entries = [e for e in entries if params is not None and norm(e.get("params")) != norm(params)] + [new]
            data.setdefault(notebook, {})[run] = entries
            f.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        for k in values:  # what the check prints on a rerun that reproduces these numbers
            print(f"{k}: ok")
        return {k: True for k in values}
    data = json.loads(f.read_text()) if f.exists() else {}
    entries = data.get(notebook, {}).get(run, [])
    match = next((e for e in entries if params is None or norm(e.get("params")) == norm(params)), None)
    if match is None:
        print(f"no expected numbers committed for {notebook} on run {run!r} with these parameters; nothing to check")
        return {}
    table = match["values"]
    ok, bad = {}, []
    # the computed dict's order first (what record mode printed), then names this run did not compute
    for name in [k for k in values if k in table] + [k for k in table if k not in values]:
        exp = table[name]
        if name not in values:
            bad.append(f"{name}: not computed in this run")
            ok[name] = False
            continue
        asked = per(tol, name)
        if asked is not None and float(asked) != float(exp["tol"]):
            bad.append(f"{name}: the notebook's tolerance {asked} is not the recorded {exp['tol']}; record the "
                       "numbers again (DIFFSEG_RECORD_EXPECTED=1) so expected.json and the notebook agree")
            print(bad[-1])
            ok[name] = False
            continue
        diff = abs(float(values[name]) - float(exp["value"]))
        ok[name] = diff <= float(exp["tol"])
        if ok[name]:
            print(f"{name}: ok")
        else:
            bad.append(f"{name}: {float(values[name]):.4f} differs from the expected {exp['value']:.4f} "
                       f"by {diff:.4f} (tolerance {exp['tol']}: {exp.get('why', '')})")
            print(bad[-1])
    if bad and strict:
        raise AssertionError("numbers differ from notebooks/expected.json:\n" + "\n".join(bad))
    return ok
