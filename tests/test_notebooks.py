"""The notebooks adapt: one parameter cell holds every choice; numbers are checked, not just shown."""
import ast
import json
import re
from pathlib import Path

import pytest

from diffseg_utils.datasets import list_datasets
from diffseg_utils.registry import REPO_ROOT, list_backbones
from diffseg_utils.report import check_expected, run_name

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


EXECUTED = NOTEBOOKS  # every notebook is committed executed, and nbval reruns each
NAMES = set(list_backbones()) | set(list_datasets())
# the toy worlds' own modules name the toy; only the parameter cell (and notebook 00, which is about
# the shipped toy models and guards its toy-only section by the backbone's own quality record) may
TOY_MODULES = re.compile(r"diffseg_utils\.toy\b|from diffseg_utils import toy|\bworld\.(render|CATEGORIES)")


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_parameter_cell(path):
    cells = _code_cells(path)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], f"{path.name}: the first code cell, and only it, must be tagged 'parameters'"
    src = "".join(cells[0]["source"])
    assert "BACKBONE" in src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """`reproduce --set NAME=...` injects through papermill, whose parser skips a line it cannot read
    (an '=' inside the comment, for one) and then warns "Passed unknown parameter"."""
    papermill = pytest.importorskip("papermill")
    cell = _code_cells(path)[0]
    assigned = {t.id for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    assigned |= {e.id for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Tuple) for e in t.elts}
    missed = assigned - set(papermill.inspect_notebook(str(path)))
    assert not missed, f"{path.name}: papermill cannot read the parameter line(s) of {sorted(missed)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_only_the_parameter_cell_names_a_backbone_or_dataset(path):
    for i, c in enumerate(_code_cells(path)[1:], 1):
        src = "".join(c["source"])
        quoted = set(re.findall(r"""["']([A-Za-z0-9_.\-]+)["']""", src))
        named = sorted(quoted & NAMES)
        assert not named, f"{path.name} code cell {i} names {named}; move the choice into the parameter cell"
        if not path.name.startswith("00_"):
            assert not TOY_MODULES.search(src), f"{path.name} code cell {i} uses a toy module: {TOY_MODULES.search(src)[0]}"


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.stem)
def test_notebook_ends_with_a_self_check(path):
    last = "".join(_code_cells(path)[-1]["source"])
    assert last.startswith("# NBVAL_CHECK_OUTPUT") and "check_expected(" in last
    outputs = "".join("".join(o.get("text", "")) for o in _code_cells(path)[-1].get("outputs", []))
    assert ": ok" in outputs, f"{path.name}: the committed self-check output shows no checked number"
    # a bare expression as the last statement would add an execute_result nbval compares too
    assert not isinstance(ast.parse(last).body[-1], ast.Expr), f"{path.name}: assign the self-check's result"


@pytest.mark.parametrize("path", NOTEBOOKS + sorted((REPO_ROOT / "docs" / "runs").glob("*/*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_outputs_are_clean(path):
    text = json.dumps([c.get("outputs", []) for c in _code_cells(path)])  # outputs only: sources may show paths
    for pattern, what in [(r"<Axes: ", "a stray Axes repr"), (r"Text\(\d", "a stray Text repr"),
                          (r" at 0x[0-9a-f]{6,}", "a memory address"), (r"/tmp/", "a temporary path"),
                          (r"/work/", "this machine's path"), (r"IOPub data rate", "a throttled output"),
                          (r"\d+%\|", "a stale progress bar")]:
        assert not re.search(pattern, text), f"{path.name} holds {what}"


def test_check_expected_records_checks_and_refuses(tmp_path, monkeypatch, capsys):
    f = tmp_path / "expected.json"
    params = {"N": 20}
    monkeypatch.setenv("DIFFSEG_RECORD_EXPECTED", "1")
    # keys deliberately not in sorted order: the file is written sorted, the lines follow the computation
    check_expected("nb", "toy", {"b": 0.25, "a": 0.5}, params=params, tol=0.01, why="seeded", path=f)
    recorded = capsys.readouterr().out.splitlines()
    assert recorded == ["b: ok", "a: ok"]
    monkeypatch.delenv("DIFFSEG_RECORD_EXPECTED")
    assert check_expected("nb", "toy", {"b": 0.25, "a": 0.505}, params=params, path=f) == {"a": True, "b": True}
    assert capsys.readouterr().out.splitlines() == recorded  # a rerun prints what nbval compares with
    with pytest.raises(AssertionError, match="a: 0.5200 differs"):
        check_expected("nb", "toy", {"a": 0.52, "b": 0.25}, params=params, path=f)
    with pytest.raises(AssertionError, match="b: not computed"):
        check_expected("nb", "toy", {"a": 0.5}, params=params, path=f)
    # another run or other parameters: nothing is checked (and nothing fails)
    assert check_expected("nb", "sd-1.5", {"a": 0.9}, params=params, path=f) == {}
    assert check_expected("nb", "toy", {"a": 0.9}, params={"N": 5}, path=f) == {}
    # a second parameter set is kept beside the first
    monkeypatch.setenv("DIFFSEG_RECORD_EXPECTED", "1")
    check_expected("nb", "toy", {"a": 0.7}, params={"N": 5}, tol=0.01, path=f)
    monkeypatch.delenv("DIFFSEG_RECORD_EXPECTED")
    assert len(json.loads(f.read_text())["nb"]["toy"]) == 2
    assert check_expected("nb", "toy", {"a": 0.5, "b": 0.25}, params=params, path=f)["a"]
    # one source of tolerances: the notebook's tol must be the recorded one (per name when a dict)
    assert all(check_expected("nb", "toy", {"a": 0.5, "b": 0.25}, params=params, tol=0.01, path=f).values())
    with pytest.raises(AssertionError, match="a: the notebook's tolerance 0.05 is not the recorded 0.01"):
        check_expected("nb", "toy", {"a": 0.5, "b": 0.25}, params=params, tol={"a": 0.05, "b": 0.01}, path=f)
    monkeypatch.setenv("DIFFSEG_RECORD_EXPECTED", "1")
    with pytest.raises(ValueError, match="needs a tolerance"):
        check_expected("nb", "toy", {"a": 0.5, "b": 0.25}, params=params, tol={"a": 0.05}, path=f)


def test_run_name():
    assert run_name("toy-faces-ddpm", "toy-faces") == "toy-faces-ddpm__toy-faces"
    assert run_name("/some/dir/my model", None) == "my-model"
    assert run_name(None, None) == "toy"


def test_committed_expected_numbers_cover_every_executed_notebook():
    data = json.loads((REPO_ROOT / "notebooks" / "expected.json").read_text())
    for path in EXECUTED:
        assert data.get(path.stem), f"no expected numbers committed for {path.stem}"


def test_reproduce_restores_the_environment(tmp_path, monkeypatch):
    """reproduce sets the kernels' variables only while it runs (it used to leave DIFFSEG_RESULTS set)."""
    import os

    import diffseg_utils.__main__ as cli

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("DIFFSEG_SECTION", raising=False)
    before = os.environ.get("DIFFSEG_RESULTS")
    seen = {}
    monkeypatch.setattr("papermill.execute_notebook", lambda src, dst, **kw: (
        seen.update({k: os.environ.get(k) for k in ("MPLBACKEND", "DIFFSEG_RESULTS", "DIFFSEG_SECTION")}),
        __import__("shutil").copy(src, dst)))
    cli.reproduce(["00"], results=tmp_path, progress=False)
    assert seen["MPLBACKEND"] == cli.NOTEBOOK_PLOT_BACKEND and seen["DIFFSEG_SECTION"] == "00_data_and_backbones"
    assert seen["DIFFSEG_RESULTS"].startswith(str(tmp_path))
    assert os.environ.get("DIFFSEG_RESULTS") == before and "DIFFSEG_SECTION" not in os.environ
    assert os.environ["MPLBACKEND"] == "Agg"


def _expected_entries():
    import json

    from diffseg_utils.report import EXPECTED_FILE

    data = json.loads(EXPECTED_FILE.read_text())
    return [(nb, run, i, e) for nb, runs in data.items() for run, es in runs.items() for i, e in enumerate(es)]


@pytest.mark.parametrize("nb,run,i,entry", _expected_entries(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_self_check_fails_when_a_number_moves(nb, run, i, entry, capsys):
    """Each committed check path (notebook, run, parameters): the committed numbers pass, and moving any one of
    them by twice its tolerance fails the check."""
    from diffseg_utils.report import check_expected

    values = {k: v["value"] for k, v in entry["values"].items()}
    assert all(check_expected(nb, run, values, params=entry["params"]).values())
    for name, v in entry["values"].items():
        moved = dict(values, **{name: v["value"] + 2 * v["tol"] + 1e-9})
        with pytest.raises(AssertionError, match=name):
            check_expected(nb, run, moved, params=entry["params"])
    capsys.readouterr()


# ---------------------------------------------------------------- numbers in prose come from the run
PAPER_FIGURES = {"59.1", "58.8", "49.4", "45.0", "33.1", "29.1", "30.5", "27.6", "74.4", "44.3", "71.0", "64.6", "47.6"}
"""Figures quoted from the papers (DDPM-Seg Table 2, EmerDiff, Grounded Diffusion, ConceptAttention): allowed in
markdown. Version numbers of model names ("Stable Diffusion 1.5") are allowed too."""
MODEL_VERSIONS = {"1.5", "2.1", "3.5"}
_DECIMAL = __import__("re").compile(r"(?<![\w.])(\d{1,2}\.\d{1,4})(?![\d.])")


def stray_numbers(nb: dict) -> list[str]:
    """Decimal numbers in a notebook's markdown that are neither paper figures nor in its code or outputs."""
    text = ""
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            text += "".join(c["source"])
            for o in c.get("outputs", []):
                data = o.get("data", {})
                text += "".join(o.get("text", "")) + "".join(data.get("text/plain", "")) + "".join(data.get("text/markdown", ""))
    found = [m.group(1) for c in nb["cells"] if c["cell_type"] == "markdown"
             for m in _DECIMAL.finditer("".join(c["source"]))]
    return [n for n in found if n not in PAPER_FIGURES | MODEL_VERSIONS and n not in text]


def test_a_stray_number_in_markdown_is_caught():
    nb = {"cells": [{"cell_type": "markdown", "source": ["the module reaches 0.62 (paper: 74.4) on SD 1.5"]},
                    {"cell_type": "code", "source": ["x = 1"], "outputs": [{"text": ["0.615\n"]}]}]}
    assert stray_numbers(nb) == ["0.62"]
    nb["cells"][1]["outputs"][0]["text"] = ["0.62\n"]
    assert stray_numbers(nb) == []


@pytest.mark.parametrize("path", NOTEBOOKS + sorted((REPO_ROOT / "docs" / "runs").glob("*/*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_markdown_numbers_come_from_the_run_or_the_papers(path):
    """A number typed into prose goes stale on the next run or backbone: findings are rendered from the values."""
    assert stray_numbers(json.loads(path.read_text())) == [], f"{path.name}: numbers in markdown not in the run"
