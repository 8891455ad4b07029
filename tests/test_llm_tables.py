"""Tables and figures of ``llm_head train``/``evaluate`` a user can read: the worst row is one named
group, the extremes and the two means are labelled rows of their own, small test groups are flagged
with the interval their size allows, the run folder records α* and what the objective's value means,
and ``groups.png`` shows the reference head beside the run and α* (not α over the iterations)."""
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

import llm_head as lh  # noqa: E402
import llm_head.__main__ as cli_module  # noqa: E402
import loglinear_grpo as lg  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402
from llm_head.train import AGGREGATES, objective_meaning  # noqa: E402
from loglinear_grpo.inference import proportion_interval, small_group_note  # noqa: E402

from conftest import ROOT, make_problem  # noqa: E402
from test_llm_data import extracted_work_folder, shared_pairs  # noqa: E402,F401  (fixture; gemma_folder is in conftest)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
COLUMNS = ["loss", "rewards/accuracies", "rewards/margins", "logps/accuracies"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_pairs, gemma_folder):
    """The shared pairs (3 groups, a few test pairs each) extracted once into a work folder."""
    return extracted_work_folder(tmp_path_factory.mktemp("tables"), shared_pairs, gemma_folder)


def _train(work, run, capsys, *extra):
    capsys.readouterr()
    assert cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", run, *extra]) == 0
    return capsys.readouterr().out


def _settings(work, run):
    with open(work / "runs" / run / "settings.json") as fh:
        return json.load(fh)


def _check_aggregates(table):
    groups = table.loc["group"].dropna(subset=["loss"])
    agg = table.loc["aggregate"]
    assert list(agg.index) == list(AGGREGATES) == ["worst", "extreme", "mean over groups", "mean over pairs"]
    # the worst row is one group's row, every column of it, and names that group
    worst = agg.loc["worst"]
    name = worst["worst_group"]
    assert name == groups["loss"].idxmax()
    for col in COLUMNS + ["n_pairs"]:
        assert worst[col] == pytest.approx(groups.loc[name, col], rel=1e-12)
    # the per-column extremes, apart, with no pair count of their own
    extreme = agg.loc["extreme"]
    assert extreme["loss"] == pytest.approx(groups["loss"].max())
    for col in ("rewards/accuracies", "rewards/margins", "logps/accuracies"):
        assert extreme[col] == pytest.approx(groups[col].min())
    assert pd.isna(extreme["n_pairs"]) and pd.isna(extreme["worst_group"])
    # two labelled means: unweighted over groups (no pair count) and pair-weighted (all the pairs)
    n = groups["n_pairs"].astype(float)
    for col in COLUMNS:
        assert agg.loc["mean over groups", col] == pytest.approx(groups[col].mean())
        assert agg.loc["mean over pairs", col] == pytest.approx(float((n * groups[col]).sum() / n.sum()))
    assert pd.isna(agg.loc["mean over groups", "n_pairs"])
    assert agg.loc["mean over pairs", "n_pairs"] == n.sum()


@pytest.mark.parametrize("settings", [{}, {"method": "vanilla"}, {"method": "importance_sampling"}, {"chi": 0.5},
                                      {"adjustment": 1.0}, {"method": "vanilla", "adjustment": 2.0},
                                      {"chi": 0.25, "adjustment": 1.0}])
def test_objective_meaning_is_the_solvers(settings):
    """The words of settings.json's certificate are the solver's own (SolverConfig.objective_name)."""
    config = lg.make_config(make_problem(), **settings)
    meaning = objective_meaning(settings.get("method", "group_robust"), settings.get("chi", 1.0),
                                settings.get("adjustment", 0.0))
    assert meaning == f"{config.objective_name} (train)"
    assert objective_meaning("group_robust") == "worst-group loss (train)"
    assert objective_meaning("vanilla") == "mean loss over pairs (train)"


def test_tables_settings_and_figure(work, capsys, monkeypatch):
    out = _train(work, "gr", capsys)
    settings = _settings(work, "gr")
    problem, _ = lh.load_problem(str(work))
    train_names = list(problem.data("train").group_names)
    # α*, on the simplex, named by the training groups; what the value means
    alpha = settings["alpha_star"]
    assert list(alpha) == train_names and sum(alpha.values()) == pytest.approx(1.0)
    assert all(w >= 0 for w in alpha.values())
    cert = settings["certificate"]
    assert cert["objective"] == "worst-group loss (train)"
    theta = np.load(work / "runs" / "gr" / "theta.npy")
    losses = lg.group_losses(theta, problem.data("train"), "sigmoid", 0.1)
    assert cert["value"] == pytest.approx(losses.max(), rel=1e-9)
    # the printed summary names the worst training group and what the value is
    summary = [line for line in out.splitlines() if line.startswith("training objective")]
    assert len(summary) == 1 and " value=" not in summary[0]
    worst = train_names[int(np.argmax(losses))]
    assert "worst-group loss (train) = " in summary[0]
    assert f"worst train group: {worst} {losses.max():.4f}" in summary[0]
    # which second-order solver ran, why, and the predicted and peak memory (issue 21)
    solver_line = out.splitlines()[out.splitlines().index(summary[0]) + 1]
    assert solver_line.startswith("solver: newton (dense/row-space Newton): the dense solver's matrices")
    assert "predicted" in solver_line and "process peak" in solver_line
    assert settings["solver"]["estimator"] == "newton" and settings["memory"]["estimator"] == "newton"
    assert settings["memory"]["peak_rss_bytes"] > settings["memory"]["dense_bytes"] > 0

    # every split's table: the worst row one named group, the extremes and the means labelled
    for split in ("train", "test"):
        table = pd.read_csv(work / "runs" / "gr" / f"metrics_{split}.csv", index_col=["kind", "group"])
        _check_aggregates(table)
        _check_aggregates(lh.evaluate(problem, theta, "sigmoid", 0.1, split))

    # small test groups are flagged in the printed table, with the interval their size allows
    assert cli(["evaluate", "--workdir", str(work), "--run", "gr"]) == 0
    printed = capsys.readouterr().out
    test = lh.evaluate(problem, theta, "sigmoid", 0.1, "test").loc["group"].dropna(subset=["loss"])
    assert (test["n_pairs"] < 30).all()                    # the fixture's test groups are all small
    assert sum("< 30 pairs" in line for line in printed.splitlines()) == len(test)
    for name, row in test.iterrows():
        note = small_group_note(int(row["n_pairs"]), float(row["rewards/accuracies"]))
        assert f"note: group {name}: {note}" in printed                     # the interval of its size
        low, high = proportion_interval(float(row["rewards/accuracies"]) * row["n_pairs"], int(row["n_pairs"]))
        assert f"< 30 pairs, {low:.2f} to {high:.2f}" in printed
    assert "  worst: the worst group" in printed and "  mean over pairs: pair-weighted" in printed

    # groups.png: the reference head beside the run, and α* from settings.json
    drawn = {}
    real = cli_module.plot_run

    def spy(heads, alpha_star, path, title, split):
        drawn.update(heads=heads, alpha_star=alpha_star)
        return real(heads, alpha_star, path, title, split)
    monkeypatch.setattr(cli_module, "plot_run", spy)
    png = work / "runs" / "gr" / "groups.png"
    png.unlink()
    assert cli(["evaluate", "--workdir", str(work), "--run", "gr"]) == 0
    assert png.stat().st_size > 0
    reference, run = drawn["heads"].values()
    expected = lh.evaluate(problem, problem.theta_ref, "sigmoid", 0.1, "test")
    np.testing.assert_allclose(reference.loc["group", "loss"], expected.loc["group", "loss"])
    assert drawn["alpha_star"] == alpha
    # a run from before alpha_star was recorded: α* is the last row of history.csv
    path = work / "runs" / "gr" / "settings.json"
    old = {k: v for k, v in settings.items() if k != "alpha_star"}
    path.write_text(json.dumps(old))
    assert cli(["evaluate", "--workdir", str(work), "--run", "gr"]) == 0
    last = pd.read_csv(work / "runs" / "gr" / "history.csv").iloc[-1]
    assert drawn["alpha_star"] == pytest.approx({g: last[f"alpha/{g}"] for g in train_names})


def test_vanilla_summary_names_the_worst_group(work, capsys):
    out = _train(work, "van", capsys, "--method", "vanilla")
    settings = _settings(work, "van")
    assert settings["certificate"]["objective"] == "mean loss over pairs (train)"
    assert sum(settings["alpha_star"].values()) == pytest.approx(1.0)
    summary = [line for line in out.splitlines() if line.startswith("training objective")]
    assert len(summary) == 1 and " value=" not in summary[0]
    assert "mean loss over pairs (train) = " in summary[0] and "worst train group: " in summary[0]
    problem, _ = lh.load_problem(str(work))
    data = problem.data("train")
    theta = np.load(work / "runs" / "van" / "theta.npy")
    losses = lg.group_losses(theta, data, "sigmoid", 0.1)
    assert settings["certificate"]["value"] == pytest.approx(float(data.group_sizes @ losses / data.n_samples))
    assert f"worst train group: {data.group_names[int(np.argmax(losses))]} {losses.max():.4f}" in summary[0]


def test_plot_run_many_groups_and_heads(tmp_path):
    """groups.png with 14 long-named groups and three heads (a later ``compare``)."""
    names = [f"Country number {k} with a long name" for k in range(14)]
    rng = np.random.default_rng(0)

    def table():
        groups = pd.DataFrame({"loss": rng.random(14), "rewards/accuracies": rng.random(14),
                               "n_pairs": rng.integers(1, 50, 14)}, index=pd.Index(names, name="group"))
        return lg.objective.with_aggregates(groups, groups.iloc[:1].rename(index={names[0]: "worst"}))
    heads = {"reference": table(), "vanilla": table(), "GR": table()}
    alpha = dict(zip(names, np.full(14, 1 / 14)))
    path = tmp_path / "groups.png"
    cli_module.plot_run(heads, alpha, str(path), "three heads", "test")
    assert path.stat().st_size > 0


def test_adjustment_flag(work, capsys):
    out = _train(work, "adj", capsys, "--adjustment", "1.5")
    settings = _settings(work, "adj")
    assert settings["adjustment"] == 1.5 and settings["solver"]["adjustment"] is not None
    assert settings["certificate"]["objective"] == "worst-group adjusted loss (train)"
    assert "worst-group adjusted loss (train) = " in out
    with pytest.raises(SystemExit):
        cli(["train", "--workdir", str(work), "--run", "bad", "--adjustment", "-1"])


def test_train_with_the_matrix_free_solver_through_the_cli(work, capsys):
    """`--estimator newton_cg --max-cg N`: the same certified optimum as the default solver, the solver
    line names it, settings.json records it and its budget (issue 21)."""
    out = _train(work, "cg", capsys, "--estimator", "newton_cg", "--max-cg", "80")
    dense = _settings(work, "gr") if (work / "runs" / "gr").exists() else None
    settings = _settings(work, "cg")
    assert settings["solver"]["estimator"] == "newton_cg" and settings["solver"]["max_cg"] == 80
    assert settings["certificate"]["converged"] and settings["memory"]["estimator"] == "newton_cg"
    line = [x for x in out.splitlines() if x.startswith("solver: ")]
    assert len(line) == 1 and line[0].startswith("solver: newton_cg (matrix-free Newton-CG): estimator='newton_cg' was asked for")
    assert "Hessian products" in line[0]
    if dense is not None and dense["certificate"]["converged"]:
        assert settings["certificate"]["value"] == pytest.approx(dense["certificate"]["value"], rel=2e-6, abs=2e-6)
    with pytest.raises(SystemExit, match="--max-cg: only for the matrix-free solver"):
        cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", "bad", "--max-cg", "5", "--estimator", "full"])
