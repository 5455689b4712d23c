"""benchmarks/run_all.py at toy size (--quick): every method runs, every figure is reported.

The full-size run (``python benchmarks/run_all.py``) takes ~47 minutes on a 2-core CPU in float32 and
is not part of the test suite; this checks the command itself: each method's row, its UNet evaluation count against
the UNet calls actually made, the growth exponents, the plots, the run's JSON and table.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["features", "ddpmseg-fit", "ddpmseg-predict", "emerdiff", "daam", "grounding", "synthesis",
           "grounding-train"]


@pytest.fixture(scope="module", params=["unets", "sd3-medium"])
def quick_run(request, tmp_path_factory):
    """The toy-size run on the UNets (ADM + SD 1.5) and on the SD3 MM-DiT (every method on one backbone)."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out-dir", str(out),
                           "--backbone", request.param], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = "cpu-float32-quick" + ("" if request.param == "unets" else f"-{request.param}")
    return out, proc.stdout, json.loads((out / f"{key}.json").read_text()), key


def test_every_method_reports_its_figures(quick_run):
    out, stdout, res, key = quick_run
    by_name = {m["name"]: m for m in res["methods"]}
    assert sorted(by_name) == sorted(METHODS)
    for name in ("features", "emerdiff", "daam", "grounding", "synthesis"):
        m = by_name[name]
        assert len(m["points"]) >= 2, name  # cost against work needs several sizes
        assert math.isfinite(m["time_exponent"]) and math.isfinite(m["memory_exponent"]), name
        for p in m["points"]:
            assert p["seconds"] > 0 and p["unet_seconds"] > 0 and math.isfinite(p["ratio"]), (name, p)
            assert p["must_hold"] > 0, (name, p)
        assert (out / f"scaling_{name}_cpu.png").stat().st_size > 1000
    for name in ("ddpmseg-fit", "ddpmseg-predict", "grounding-train"):
        assert by_name[name]["points"][0]["seconds"] > 0
    text = (out / f"{key}.md").read_text()
    assert "ratio (goal <= 1.2)" in text
    for name in METHODS:
        assert f"| {name} |" in text and f"| {name} |" in stdout


def test_unet_evaluations_match_the_calls_made(quick_run):
    """The denominator counts what the method must evaluate; the forward pre-hook counts what it did.

    Features, the attention maps, grounding and synthesis make exactly their required denoiser evaluations
    (a redundant call would show here); EmerDiff on a UNet makes fewer batch elements than its minimum count,
    because the t_m pass shares the UNet prefix (run once at batch 1) across its 2K runs; on the MM-DiT
    (no shared prefix) exactly its count."""
    _, _, res, key = quick_run
    for m in res["methods"]:
        for p in m["points"]:
            if m["name"] == "emerdiff" and "sd3" in key:
                assert p["seen"] == p["unet_evals"], p
            elif m["name"] == "emerdiff":
                assert 0 < p["seen"] < p["unet_evals"], p
            elif m["name"] in ("features", "daam", "grounding", "synthesis"):
                assert p["seen"] == p["unet_evals"], (m["name"], p)


def test_a_run_of_some_methods_is_its_own_run():
    """``--only`` runs (how a slow CPU run is split) write their own files, never the whole run's, nor each other's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run_all import METHODS as ALL, run_key
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cpu, f32 = torch.device("cpu"), torch.float32
    assert run_key(cpu, f32, False, set(ALL)) == "cpu-float32"
    sd = run_key(cpu, f32, False, {"emerdiff", "daam"})
    adm = run_key(cpu, f32, False, {"ddpmseg", "features"})
    assert sd == "cpu-float32-only-emerdiff+daam" and adm == "cpu-float32-only-features+ddpmseg"
    assert run_key(cpu, f32, False, set(ALL), "sd3-medium") == "cpu-float32-sd3-medium"
    assert run_key(cpu, f32, True, {"daam"}) == "cpu-float32-quick-only-daam"


def test_ensemble_breakdown_runs_at_toy_width(capsys):
    """``benchmarks/ensemble.py --breakdown`` takes a step apart; here at 64 dims so it runs in a second."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ensemble import breakdown
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    breakdown(dim=64, num_classes=34, members=2)
    out = capsys.readouterr().out
    assert "at 64 dims, h1 = 256" in out and "whole step" in out
    bound = float(out.split("those three parts): ")[1].split("x")[0])
    assert bound > 1.0  # the three parts are a strict subset of DDPM-Seg's step
