"""Issue 22, "What a new user hit": the main job with one seed and bad flags, its help and output, and the
core API's Θ arguments, solve_exact's methods and χ, and the metrics' training-α column."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import loglinear_grpo as lg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "loglinear_grpo", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_mainjob_one_seed_writes_figure_md_and_csv(tmp_path):
    out = tmp_path / "demo"
    run = _job("--seeds", "1", "--steps", "20", "--jobs", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("imbalanced_both.png", "imbalanced_both.md", "sweep_imbalanced_both.csv",
                 "sweep_imbalanced_both.json"):
        assert (out / name).is_file(), name
    assert "± n/a" in run.stdout and "1 seed," in run.stdout and "1 seeds" not in run.stdout
    md = (out / "imbalanced_both.md").read_text()
    # the .md holds the tables the job printed, not the long-format dump
    for method in ("DPO", "IS-DPO", "GR-DPO", "IPO", "IS-IPO", "GR-IPO"):
        assert f"  {method:7s} preset : worst val loss" in md
    assert "alpha/group 0" in md and "± n/a" in md
    worst = [line for line in run.stdout.splitlines() if "preset :" in line or "optimum:" in line]
    assert len(worst) == 12 and all(line in md for line in worst)
    assert "scenario  method" not in md


@pytest.mark.parametrize("flag,value", [("--seeds", "0"), ("--steps", "-5"), ("--jobs", "0"),
                                        ("--seeds", "x")])
def test_mainjob_bad_counts_are_argparse_errors(tmp_path, flag, value):
    run = _job(flag, value, "--out", str(tmp_path / "x"))
    assert run.returncode == 2
    assert flag in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x").exists()


def test_mainjob_help_tells_the_truth():
    run = _job("--help")
    assert run.returncode == 0
    assert "all its iterations" not in run.stdout
    assert "3000" in run.stdout and "20000" in run.stdout and "10000" in run.stdout
