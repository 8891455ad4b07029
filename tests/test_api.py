"""Validation at the boundary, checkpoints, history and metrics."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import loglinear_grpo as lg


def _data(**kw):
    rng = np.random.default_rng(0)
    args = dict(diff=rng.normal(size=(10, 3)), groups=np.arange(10) % 2)
    args.update(kw)
    return lg.PreferenceData(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(diff=np.full((10, 3), np.nan)), "diff"),
    (dict(diff=np.ones((9, 3))), "groups"),
    (dict(diff=np.ones(10)), "diff"),
    (dict(ref_margin=np.r_[np.inf, np.zeros(9)]), "ref_margin"),
    (dict(ref_margin=np.zeros(4)), "ref_margin"),
    (dict(groups=np.r_[-1, np.arange(9) % 2]), "groups"),
    (dict(groups=np.arange(10) % 2 + 0.5), "groups"),
    (dict(groups=np.arange(10) % 2, group_names=["a"]), "groups"),
    (dict(groups=np.arange(10) % 2, group_names=["a", "b", "c"]), "hold no pairs"),
    (dict(groups=np.arange(10) % 2, n_groups=0), "n_groups"),
])
def test_bad_data_raises_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _data(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"), (dict(beta=np.inf), "beta"), (dict(beta=-1), "beta"),
    (dict(loss="kto"), "loss"), (dict(method="robust"), "method"), (dict(estimator="adam"), "estimator"),
    (dict(chi=1.5), "chi"), (dict(chi=-0.1), "chi"), (dict(radius=0.0), "radius"), (dict(radius=-2), "radius"),
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(estimator="closed_form", loss="dpo"), "closed_form"),
    (dict(step_size="fast"), "step_size"), (dict(step_size=-1.0), "step_size"),
    (dict(chi=0.5, method="vanilla"), "chi"), (dict(batch_size=0), "batch_size"),
    (dict(theta0=np.ones(4)), "theta0"), (dict(seed=-1), "seed"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lg.solve(_data(), **{"steps": 5, "estimator": "full", **kwargs})


def test_group_losses_validates():
    with pytest.raises(ValueError, match="theta"):
        lg.group_losses(np.ones(4), _data())
    with pytest.raises(ValueError, match="data"):
        lg.group_losses(np.ones(3), np.ones((10, 3)))


def test_from_features_and_margins():
    rng = np.random.default_rng(0)
    pw, pl = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    lw, ll = rng.normal(size=6), rng.normal(size=6)
    data = lg.PreferenceData.from_features(pw, pl, [0, 1, 0, 1, 2, 2], lw, ll, group_names=["a", "b", "c"])
    theta = rng.normal(size=3)
    # h = log π_θ(y_w)/π_ref(y_w) − log π_θ(y_l)/π_ref(y_l): the partition function cancels
    np.testing.assert_allclose(lg.margins(theta, data), (pw - pl) @ theta - (lw - ll))
    assert data.group_names == ("a", "b", "c") and list(data.group_sizes) == [2, 2, 2]


def test_history_and_metrics(problem):
    res = lg.solve(problem, loss="dpo", estimator="full", steps=100, log_every=10, radius=1.0, tol=None)
    h = res.history
    assert list(h["step"]) == list(range(0, 101, 10))
    for name in problem.group_names:
        assert f"loss/{name}" in h and f"alpha/{name}" in h
    np.testing.assert_allclose(h.filter(like="alpha/").sum(axis=1), 1.0)
    np.testing.assert_allclose(h["worst_loss"], h.filter(like="loss/").max(axis=1))
    m = res.metrics(problem)
    assert list(m.loc["group"].index) == list(problem.group_names)
    assert list(m.loc["aggregate"].index) == ["worst", "extreme", "mean over groups", "mean over pairs"]
    assert m.loc[("aggregate", "worst"), "loss"] == pytest.approx(res.worst_group_loss(problem))
    worst = m.loc[("aggregate", "worst"), "worst_group"]                 # the worst row is one group's row
    for column in ("loss", "rewards/accuracies", "rewards/margins", "n_pairs", "train_alpha"):
        assert m.loc[("aggregate", "worst"), column] == m.loc[("group", worst), column]
    n = m.loc["group", "n_pairs"].to_numpy(dtype=float)
    assert m.loc[("aggregate", "mean over pairs"), "loss"] == pytest.approx(n @ m.loc["group", "loss"] / n.sum())
    assert m.loc[("aggregate", "extreme"), "rewards/accuracies"] == m.loc["group", "rewards/accuracies"].min()
    assert {"loss", "rewards/accuracies", "rewards/margins", "train_alpha", "n_pairs"} <= set(m.columns)
    assert ((m["rewards/accuracies"] >= 0) & (m["rewards/accuracies"] <= 1)).all()


@pytest.mark.parametrize("estimator", ["stochastic", "full", "closed_form"])
def test_resume_is_bit_identical(tmp_path, problem, estimator):
    kw = dict(loss="ipo" if estimator == "closed_form" else "dpo", estimator=estimator, steps=250,
              radius=2.0, step_size=None if estimator != "stochastic" else 0.05, alpha_step_size=0.3,
              batch_size=4, log_every=25, seed=3, tol=None)
    reference = lg.solve(problem, **kw)
    ckpt = tmp_path / "run.npz"

    class Kill(Exception):
        pass

    def die(state, info):
        if state.step == 137:
            raise Kill

    with pytest.raises(Kill):
        lg.solve(problem, checkpoint=ckpt, checkpoint_every=50, callback=die, **kw)
    assert ckpt.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".ckpt-")]
    resumed = lg.solve(problem, checkpoint=ckpt, checkpoint_every=50, **kw)
    np.testing.assert_array_equal(resumed.theta, reference.theta)
    np.testing.assert_array_equal(resumed.theta_last, reference.theta_last)
    np.testing.assert_array_equal(resumed.state.log_alpha, reference.state.log_alpha)
    pd.testing.assert_frame_equal(resumed.history, reference.history)
    with pytest.raises(ValueError, match="checkpoint"):
        lg.solve(problem, checkpoint=ckpt, **{**kw, "seed": 4})


def test_resume_after_sigkill(tmp_path):
    """A process killed mid-run (SIGKILL) resumes from its last checkpoint, bit-identically."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import loglinear_grpo as lg
        from conftest import make_problem
        data = make_problem()
        def die(state, info):
            if sys.argv[1] == "kill" and state.step == 777:
                os.kill(os.getpid(), signal.SIGKILL)
        res = lg.solve(data, loss="dpo", estimator="stochastic", steps=1500, radius=2.0, step_size=0.05,
                       alpha_step_size=0.1, checkpoint=sys.argv[2], checkpoint_every=100, callback=die)
        np.save(sys.argv[3], np.concatenate([res.theta, res.state.log_alpha]))
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, script, "kill", tmp_path / "a.npz", tmp_path / "x.npy"], env=env)
    assert killed.returncode == -9
    subprocess.run([sys.executable, script, "run", tmp_path / "a.npz", tmp_path / "resumed.npy"], env=env, check=True)
    subprocess.run([sys.executable, script, "run", tmp_path / "b.npz", tmp_path / "fresh.npy"], env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(tmp_path / "fresh.npy"))


def test_string_group_labels_and_keyword_only_options():
    data = lg.PreferenceData(np.eye(4), ["us", "fr", "us", "fr"])
    assert data.group_names == ("us", "fr") and list(data.groups) == [0, 1, 0, 1]
    named = lg.PreferenceData(np.eye(4), ["us", "fr", "us", "fr"], group_names=["fr", "us"])
    assert list(named.groups) == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="does not list"):
        lg.PreferenceData(np.eye(4), ["us", "fr", "us", "de"], group_names=["fr", "us"])
    with pytest.raises(ValueError, match="keyword-only"):
        lg.solve(data, "dpo")
