"""Issue 20: the certified regularisation path (lg.solve_path)."""
import warnings

import numpy as np
import pytest

import loglinear_grpo as lg
from conftest import make_problem

RADII = [0.0, 0.3, 1.0, 3.0]
ADJUSTMENTS = [0.0, 1.0, 4.0]


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_every_warm_started_point_equals_a_cold_solve_within_tol(loss):
    data = make_problem(sizes=(15, 40, 90, 25), dim=6, seed=5)
    warm = lg.solve_path(data, RADII, ADJUSTMENTS, loss=loss, warm_start=True)
    cold = lg.solve_path(data, RADII, ADJUSTMENTS, loss=loss)
    assert warm.table["converged"].all() and cold.table["converged"].all()
    assert (warm.table["warm"] != False).sum() == len(RADII[1:]) * len(ADJUSTMENTS) - 1   # all but the first solve
    assert not cold.table["warm"].any()
    for (_, a), res in zip(warm.table.iterrows(), warm.results):
        ref = cold.result(a["radius"], a["adjustment"])
        tol = 1e-6 * max(1.0, abs(ref.value))
        assert abs(res.value - ref.value) <= tol + res.gap + ref.gap
        # and each is the certified optimum: the cold one's bound holds for the warm one's value
        assert res.value >= ref.lower_bound - 1e-12


def test_points_match_independent_solves_and_cvxpy():
    data = make_problem(dim=4, seed=2)
    path = lg.solve_path(data, [0.5, 2.0], [0.0, 2.0], loss="dpo")
    for (_, row), res in zip(path.table.iterrows(), path.results):
        exact = lg.solve_exact(data, loss="dpo", radius=row["radius"], adjustment=row["adjustment"])
        assert abs(res.value - exact.value) <= 1e-5 * max(1.0, exact.value)
        single = lg.solve(data, loss="dpo", radius=row["radius"], adjustment=row["adjustment"])
        assert abs(res.value - single.value) <= 1e-6 * max(1.0, single.value) + res.gap + single.gap


def test_radius_zero_is_the_reference_point_exactly():
    data = make_problem(dim=4, seed=1)
    center = np.full(data.dim, 0.1)
    path = lg.solve_path(data, [0.0, 1.0], [0.0, 2.0], center=center, loss="ipo")
    for c in (0.0, 2.0):
        ref = path.result(0.0, c)
        assert isinstance(ref, lg.ReferencePoint)
        np.testing.assert_array_equal(ref.theta, center)
        shift = lg.group_adjustment(c, data.group_sizes)
        losses = lg.group_losses(center, data, "ipo") + (0 if shift is None else shift)
        assert ref.value == pytest.approx(losses.max(), rel=1e-14)
        assert ref.gap == 0.0 and ref.converged
        assert np.isclose(ref.alpha.sum(), 1.0) and ref.alpha[np.argmax(losses)] > 0
        # a trained point never does worse on the training objective than the reference
        assert path.result(1.0, c).value <= ref.value + 1e-12


def test_the_table_is_tidy():
    data = make_problem(dim=3)
    path = lg.solve_path(data, [1.0, 0.5, 1.0], loss="dpo")       # duplicates merged, sorted
    assert list(path.table["radius"]) == [0.5, 1.0]
    assert list(path.table.columns) == ["radius", "adjustment", "value", "gap", "relative_gap", "converged",
                                        "seconds", "iterations", "passes", "warm"]
    assert len(path.results) == 2
    with pytest.raises(KeyError):
        path.result(7.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(radii=[]), "empty"), (dict(radii=[1.0, -0.5]), ">= 0"), (dict(radii=[np.inf]), "finite"),
    (dict(radii=[1.0], adjustments=[-1.0]), ">= 0"), (dict(radii=[1.0], adjustments=[]), "empty"),
    (dict(radii=[1.0], radius=2.0), "sets 'radius'"), (dict(radii=[1.0], adjustment=1.0), "sets 'adjustment'"),
    (dict(radii=[1.0], loss="nope"), "loss"), (dict(radii=["a"]), "finite numbers"),
])
def test_bad_grids_give_a_clear_error(kwargs, match):
    data = make_problem(dim=3)
    with pytest.raises(ValueError, match=match):
        lg.solve_path(data, **kwargs)


def test_the_colder_warm_start_also_equals_cold_solves():
    data = make_problem(sizes=(15, 40, 90, 25), dim=6, seed=5)
    warm = lg.solve_path(data, RADII, ADJUSTMENTS, loss="dpo", warm_start="temperature")
    cold = lg.solve_path(data, RADII, ADJUSTMENTS, loss="dpo", warm_start=False)
    for (_, a), res in zip(warm.table.iterrows(), warm.results):
        ref = cold.result(a["radius"], a["adjustment"])
        assert res.converged and abs(res.value - ref.value) <= 1e-6 * max(1.0, abs(ref.value)) + res.gap + ref.gap
    with pytest.raises(ValueError, match="warm_start"):
        lg.solve_path(data, RADII, warm_start="hot")


def test_temperature0_is_checked():
    data = make_problem(dim=3)
    with pytest.raises(ValueError, match="temperature0"):
        lg.solve(data, radius=1.0, temperature0=-1.0)
    with pytest.raises(ValueError, match="temperature0"):
        lg.solve(data, radius=1.0, estimator="full", temperature0=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.ConvergenceWarning)
        assert lg.solve(data, radius=1.0, temperature0=1e-4).converged


def test_a_warm_start_that_stalls_is_solved_again_cold(monkeypatch):
    import dataclasses

    import loglinear_grpo.path as path_module
    real = path_module.solve

    def stalling(data, config, temperature0=None, **kw):
        res = real(data, config, temperature0=temperature0, **kw)
        return dataclasses.replace(res, converged=False) if config.settings.theta0 is not None else res

    monkeypatch.setattr(path_module, "solve", stalling)
    data = make_problem(dim=3)
    for warm_start in (True, "temperature"):
        path = lg.solve_path(data, [0.5, 1.0, 2.0], loss="dpo", warm_start=warm_start)
        assert list(path.table["warm"]) == [False, "retried cold", "retried cold"]
    assert path.table["converged"].all()


def test_review_findings_on_the_path():
    """A stochastic path (tol=None) is not retried cold; radii=None and 0-d arrays are handled; the reference
    point's metrics carry train_alpha."""
    data = make_problem(dim=3)
    path = lg.solve_path(data, [0.5, 1.0], estimator="stochastic", steps=200, warm_start=True)
    assert list(path.table["warm"]) == [False, True]
    with pytest.raises(ValueError, match="radii"):
        lg.solve_path(data, None)
    assert list(lg.solve_path(data, np.float64(1.0)).table["radius"]) == [1.0]
    ref = lg.solve_path(data, [0.0]).results[0]
    assert "train_alpha" in ref.metrics(data).columns


def test_an_adjusted_problem_that_fits_every_pair_is_certified_by_the_shifts():
    """Review finding: IPO on R^d with d > N fits every pair (L_g = 0 at the optimum), so the optimum is the
    shifts' objective, max_g c_g; the trivial bound was 0 and the solve never certified."""
    data = make_problem(sizes=(3, 5, 7), dim=20, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.ConvergenceWarning)
        res = lg.solve(data, loss="ipo", adjustment=[4.0, 1.0, 0.0])
    assert res.converged and res.value == pytest.approx(4.0 / np.sqrt(3.0))
