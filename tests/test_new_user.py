"""Issue 22, "What a new user hit": the main job with one seed and bad flags, its help and output, and the
core API's Θ arguments, solve_exact's methods and χ, and the metrics' training-α column."""
from __future__ import annotations

import os
import subprocess
import warnings
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


def _data(seed=0, sizes=(120, 50, 20), d=5):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    s = rng.normal(size=(sum(sizes), d)) / np.sqrt(d)
    taste = 2.0 * rng.normal(size=(len(sizes), d))
    first = rng.random(len(s)) < 1 / (1 + np.exp(-np.sum(s * taste[groups], axis=1)))
    return lg.PreferenceData(np.where(first[:, None], s, -s), groups, group_names=["a", "b", "c"])


def test_api_best_response_takes_the_same_theta_arguments_as_solve():
    data = _data()
    alpha = np.array([0.5, 0.3, 0.2])
    theta, value = lg.best_response(alpha, data, loss="dpo", beta=1.0, radius=2.0)
    assert np.linalg.norm(theta) <= 2.0 + 1e-9
    center = np.full(data.dim, 0.1)
    t_c, v_c = lg.best_response(alpha, data, loss="dpo", beta=1.0, radius=2.0, center=center)
    assert np.linalg.norm(t_c - center) <= 2.0 + 1e-9
    t2, v2 = lg.best_response(alpha, data, loss="dpo", beta=1.0, constraint=lg.L2Ball(2.0))
    np.testing.assert_allclose(t2, theta, atol=1e-10)
    with pytest.warns(DeprecationWarning, match="theta_set"):
        t3, v3 = lg.best_response(alpha, data, loss="dpo", beta=1.0, theta_set=lg.L2Ball(2.0))
    np.testing.assert_allclose(t3, theta, atol=1e-10)
    assert value == pytest.approx(v2) == pytest.approx(v3)
    with pytest.raises(ValueError, match="either radius or constraint"):
        lg.best_response(alpha, data, radius=2.0, constraint=lg.L2Ball(2.0))
    # the weighted best response at α* of a ball-constrained solve is that solve's value
    res = lg.solve(data, loss="ipo", beta=0.1, radius=2.0)
    assert lg.best_response(res.alpha, data, loss="ipo", beta=0.1, radius=2.0)[1] == pytest.approx(
        res.value, rel=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
@pytest.mark.parametrize("method,chi", [("group_robust", 1.0), ("group_robust", 0.5), ("group_robust", 0.0),
                                        ("importance_sampling", 1.0), ("vanilla", 1.0)])
def test_api_solve_exact_has_method_and_chi(loss, method, chi):
    data = _data()
    beta = 1.0 if loss == "dpo" else 0.1
    ours = lg.solve(data, loss=loss, beta=beta, method=method, chi=chi, radius=2.0)
    exact = lg.solve_exact(data, loss=loss, beta=beta, method=method, chi=chi, radius=2.0)
    assert ours.converged
    assert exact.value == pytest.approx(ours.value, abs=1e-5, rel=1e-5)
    losses = lg.group_losses(exact.theta, data, loss, beta)
    if method == "group_robust":
        assert exact.value == pytest.approx((1 - chi) * losses.mean() + chi * losses.max(), rel=1e-12)
    else:
        w = data.group_sizes / data.group_sizes.sum() if method == "vanilla" else np.full(3, 1 / 3)
        np.testing.assert_allclose(exact.alpha, w)
        assert exact.value == pytest.approx(w @ losses, rel=1e-12)


def test_api_solve_exact_refuses_chi_outside_group_robust():
    with pytest.raises(ValueError, match="group_robust"):
        lg.solve_exact(_data(), method="vanilla", chi=0.5, radius=2.0)
    with pytest.raises(ValueError, match="method"):
        lg.solve_exact(_data(), method="robust", radius=2.0)


def test_api_metrics_label_the_training_alpha():
    train, val = _data(0), _data(1, sizes=(30, 30, 30))
    res = lg.solve(train, loss="dpo", beta=1.0, radius=2.0)
    m = res.metrics(val)
    assert "weight" not in m.columns and "train_alpha" in m.columns
    np.testing.assert_allclose(m.loc["group", "train_alpha"].to_numpy(), res.alpha)
    assert m.loc[("aggregate", "extreme"), "train_alpha"] == pytest.approx(res.alpha.max())
    assert list(m.loc["group", "n_pairs"]) == [30, 30, 30]      # the table is of val; α is train's


def test_mainjob_run_sweep_refuses_no_seeds_and_bad_steps():
    from loglinear_grpo.experiments import run_sweep
    with pytest.raises(ValueError, match="seeds"):
        run_sweep(scenarios=["imbalanced_both"], seeds=0, steps=10, n_jobs=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        run_sweep(scenarios=["imbalanced_both"], seeds=1, steps=-5, n_jobs=1, progress=False)


# ---------------------------------------------------------------- extending a finished run (checkpoints)
def test_api_extending_a_theory_step_run_says_exactly_why_it_cannot(tmp_path):
    """Old message: "written for other data or settings"; the theory steps depend on T, and the error says so."""
    from conftest import make_problem
    data = make_problem()
    path = tmp_path / "run.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg.solve(data, estimator="stochastic", steps=200, radius=1.0, checkpoint=path)
        with pytest.raises(ValueError, match=r"step_size: .* then, .* now.*depend on T = steps"):
            lg.solve(data, estimator="stochastic", steps=400, radius=1.0, checkpoint=path)
        lg.solve(data, estimator="stochastic", steps=200, radius=1.0, checkpoint=tmp_path / "b.npz", step_size=0.01,
                 alpha_step_size=0.01)
        with pytest.raises(ValueError, match=r"step_size: '0\.01' then, '0\.02' now"):
            lg.solve(data, estimator="stochastic", steps=400, radius=1.0, checkpoint=tmp_path / "b.npz",
                     step_size=0.02, alpha_step_size=0.01)


@pytest.mark.parametrize("first", [57, 100, 150])
def test_api_extended_full_run_stops_where_a_fresh_run_stops(tmp_path, first):
    """Old code: a run extended from a checkpoint certified on another schedule and stopped elsewhere
    (154 or 165 iterations against a fresh run's 160). Now the schedule is a function of t alone."""
    from conftest import make_problem
    data = make_problem()
    kw = dict(estimator="full", radius=2.0, tol=1e-4)
    fresh = lg.solve(data, steps=20000, **kw)
    path = tmp_path / "run.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        lg.solve(data, steps=first, checkpoint=path, **kw)
    extended = lg.solve(data, steps=20000, checkpoint=path, **kw)
    assert fresh.converged and extended.converged
    assert extended.n_iter == fresh.n_iter
    np.testing.assert_array_equal(extended.theta, fresh.theta)
    again = lg.solve(data, steps=30000, checkpoint=path, **kw)        # extending a converged run: no more steps
    assert again.n_iter == fresh.n_iter


def test_api_signature_shows_what_the_tol_default_means():
    """Old: the signature showed tol='default' while the docs said 1e-6."""
    import inspect
    shown = str(inspect.signature(lg.solve).parameters["tol"])
    assert "1e-6" in shown and "stochastic" in shown and "'default'" not in shown


def test_api_one_default_loss_everywhere():
    """Old: llm_head.train/evaluate defaulted to IPO, lg.solve to DPO, the CLI to 'sigmoid' (= DPO)."""
    import inspect

    import llm_head
    from llm_head.__main__ import build_parser
    from loglinear_grpo.losses import get_loss
    defaults = {inspect.signature(f).parameters["loss"].default
                for f in (lg.solve, lg.make_config, lg.solve_exact, llm_head.train, llm_head.evaluate)}
    train_args = build_parser().parse_args(["train", "--workdir", "w"])
    defaults.add(train_args.loss)
    assert {get_loss(d).name for d in defaults} == {"dpo"}
