"""Every pytest command the README shows must at least start: collected with --collect-only, no usage error."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_pytest_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"python -m pytest[^`\n&|]*", text)
    return sorted({c.strip().rstrip(".,;)") for c in found})


def test_the_readme_shows_its_test_commands():
    cmds = readme_pytest_commands()
    assert "python -m pytest" in cmds and any("not slow" in c for c in cmds), cmds


@pytest.mark.parametrize("cmd", readme_pytest_commands())
def test_readme_pytest_command_collects(cmd):
    args = shlex.split(cmd)[3:]  # after "python -m pytest"
    r = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    # 0: collected; 5: nothing selected (e.g. -m real_weights without the weights' tests); 4: usage error
    assert r.returncode in (0, 5), f"`{cmd}` failed to start (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
