"""pyproject.toml and environment.yml must name the same dependencies (and the README its commands)."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_matches_pyproject():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in proj["dependencies"]}
    for extra in proj["optional-dependencies"].values():
        wanted.update({_name(r): r.replace(" ", "") for r in extra})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    got = {_name(r): r.replace(" ", "") for r in pip if not r.startswith("-e")}
    assert "-e ." in pip, "environment.yml must install the package from the checkout"
    assert got == wanted, f"only in pyproject: {set(wanted.items()) - set(got.items())}; " \
                          f"only in environment.yml: {set(got.items()) - set(wanted.items())}"


def test_ci_tests_the_declared_minimum_versions():
    """The lower bounds pyproject.toml declares are the versions CI installs for its fast-suite leg."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = dict(re.findall(r'"([a-z]+)==([0-9.]+)"', ci))
    for pkg in ("diffusers", "transformers", "accelerate"):
        low = next(r for r in proj["dependencies"] if _name(r) == pkg).split(">=")[1].split(",")[0]
        assert pkg in pinned, f".ci/run installs no pinned {pkg} for the minimum-versions leg"
        assert pinned[pkg] in (low, low + ".0"), f"pyproject.toml declares {pkg}>={low} but CI tests {pkg}=={pinned[pkg]}"
    assert '-m "not slow"' in ci.split("minimum")[-1], "the minimum-versions leg must run the fast suite"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"pip install [^\n]*&& (python -m pytest[^\n`]*)", readme)
    assert m, "README must show the test command"
    assert m.group(1).strip() in ci


def test_general_modules_never_import_the_toy_worlds():
    """A user's backbone or data must not depend on toy/: only toy/ itself imports it (the registries name
    toy modules as strings, resolved when a toy entry is used)."""
    pkg = ROOT / "diffseg_utils"
    pattern = re.compile(r"^\s*(from\s+(\.|\.\.|diffseg_utils\.)toy\b|import\s+diffseg_utils\.toy\b|from\s+\.\s+import\s+toy\b)",
                         re.M)
    offenders = [str(p.relative_to(ROOT)) for p in pkg.rglob("*.py")
                 if "toy" not in p.relative_to(pkg).parts[:1] and pattern.search(p.read_text())]
    assert not offenders, offenders
