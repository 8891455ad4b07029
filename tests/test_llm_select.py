"""``llm_head select`` and ``compare``: R (and C) chosen on the validation split with R = 0 (the frozen
model) always a candidate, the choice recorded and reproducible, notes at the edge of the grid and when
the reference wins, bad grids refused naming the flag; and the reference / vanilla / GR comparison over
seeds on the test split with paired intervals (report.md, paired.csv, heads.csv, compare.png)."""
import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

import llm_head as lh  # noqa: E402
from llm_head import workdir as wd  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402
from llm_head.select import CRITERIA, choose, extended_grid, selection_notes  # noqa: E402

from test_llm_data import extracted_work_folder, shared_pairs  # noqa: E402,F401  (fixture; gemma_folder is in conftest)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
GRID = ["--radii", "0", "0.3", "1", "--adjustments", "0", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_pairs, gemma_folder):
    """The shared TRL-format pairs (3 groups) extracted once into a work folder."""
    return extracted_work_folder(tmp_path_factory.mktemp("select"), shared_pairs, gemma_folder)


def _settings(work, run):
    with open(work / "runs" / run / "settings.json") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def selected(work):
    """One select run through the CLI (GR-DPO on the small grid)."""
    assert cli(["select", "--workdir", str(work), "--loss", "dpo", *GRID, "--run", "sel"]) == 0
    return _settings(work, "sel")


# ============================================================================ select
def test_select_records_grid_scores_and_choice(work, selected):
    folder = work / "runs" / "sel"
    for name in ("theta.npy", "history.csv", "metrics_train.csv", "metrics_val.csv", "metrics_test.csv",
                 "selection.csv", "selection.png", "settings.json"):
        assert (folder / name).is_file(), name
    sel = selected["selection"]
    grid = pd.DataFrame(sel["grid"])
    assert sel["criterion"] == "worst-loss"
    assert sorted(set(grid["radius"])) == [0.0, 0.3, 1.0] and sorted(set(grid["adjustment"])) == [0.0, 1.0]
    assert len(grid) == 6 and grid["chosen"].sum() == 1
    chosen = grid[grid["chosen"]].iloc[0]
    assert {"radius": chosen["radius"], "adjustment": chosen["adjustment"]} == sel["chosen"]
    assert selected["radius"] == chosen["radius"] and selected["adjustment"] == chosen["adjustment"]
    assert chosen["score"] == pytest.approx(grid["score"].min(), rel=1e-12)     # worst-loss: the lowest wins
    # the score is the validation table's worst-group loss of the written θ
    problem, _ = wd.load_problem(str(work), seed=0, split_by=selected["split_by"])
    theta = np.load(folder / "theta.npy")
    val = lh.evaluate(problem, theta, "dpo", 0.1, "val")
    assert val.loc[("aggregate", "worst"), "loss"] == pytest.approx(chosen["score"], rel=1e-9)
    csv = pd.read_csv(folder / "selection.csv")
    assert np.allclose(csv["score"], grid["score"], rtol=1e-12)
    # everything train records, and the certificate of the chosen point
    for key in ("loss", "beta", "method", "seed", "tol", "features_sha256", "dataset_sha256", "groups",
                "storage_used", "solver", "alpha_star", "certificate"):
        assert key in selected, key
    assert selected["certificate"]["converged"]


def test_select_twice_same_choice_and_train_reproduces_theta(work, selected, capsys):
    assert cli(["select", "--workdir", str(work), "--loss", "dpo", *GRID, "--run", "sel2"]) == 0
    again = _settings(work, "sel2")["selection"]
    assert again["chosen"] == selected["selection"]["chosen"]
    assert np.allclose([r["score"] for r in again["grid"]], [r["score"] for r in selected["selection"]["grid"]],
                       rtol=1e-9)
    r, c = selected["radius"], selected["adjustment"]
    theta = np.load(work / "runs" / "sel" / "theta.npy")
    if r == 0:                       # the reference head: θ_ref itself (train has no R = 0)
        problem, _ = wd.load_problem(str(work), seed=0)
        assert np.array_equal(theta, problem.theta_ref)
        return
    assert cli(["train", "--workdir", str(work), "--loss", "dpo", "--radius", f"{r!r}", "--adjustment", f"{c!r}",
                "--run", "retrain"]) == 0
    retrained = np.load(work / "runs" / "retrain" / "theta.npy")
    ref = _settings(work, "retrain")
    # same certified objective value within the tolerance, and the same θ up to the solver's accuracy
    value = selected["certificate"]["value"]
    assert ref["certificate"]["value"] == pytest.approx(value, rel=1e-5, abs=1e-8)
    assert np.linalg.norm(retrained - theta) <= 1e-3 * max(1.0, np.linalg.norm(theta))


def test_select_vanilla_collapses_c_and_min_accuracy(work, capsys):
    capsys.readouterr()
    assert cli(["select", "--workdir", str(work), "--method", "vanilla", "--criterion", "min-accuracy",
                "--radii", "0.3", "1", "--adjustments", "0", "2", "--run", "van"]) == 0
    out = capsys.readouterr().out
    sel = _settings(work, "van")["selection"]
    grid = pd.DataFrame(sel["grid"])
    assert set(grid["adjustment"]) == {0.0}                              # C collapsed
    assert 0.0 in set(grid["radius"])                                    # R = 0 added
    assert any("does not change its minimiser" in n for n in sel["notes"])
    chosen = grid[grid["chosen"]].iloc[0]
    assert chosen["score"] == pytest.approx(grid["score"].max())          # higher is better
    assert np.allclose(grid["score"], grid["val_min_accuracy"])
    assert "does not change its minimiser" in out


# ---------------------------------------------------------------------- the choice and its notes, by hand
def _scores(points):
    return pd.DataFrame(points, columns=["radius", "adjustment", "score"])


def test_choice_ties_and_notes_on_a_hand_made_table():
    # ties (within 1e-12 relative): the smallest R, then the smallest C
    s = _scores([(0, 0, 1.0), (0.3, 0, 0.5), (0.3, 1, 0.5 * (1 + 1e-13)), (1, 0, 0.5), (1, 1, 0.7)])
    assert s.loc[choose(s, "worst-loss"), ["radius", "adjustment"]].tolist() == [0.3, 0.0]
    assert s.loc[choose(s, "min-accuracy"), "radius"] == 0.0                # highest score: the reference
    s2 = _scores([(0, 0, np.nan), (0.3, 0, 0.9), (0.3, 1, 0.9)])
    assert s2.loc[choose(s2, "worst-loss"), ["radius", "adjustment"]].tolist() == [0.3, 0.0]
    with pytest.raises(ValueError, match="finite"):
        choose(_scores([(0, 0, np.nan)]), "worst-loss")
    # the reference wins
    notes = selection_notes(s, 0.0, 0.0, "worst-loss")
    assert len(notes) == 1 and notes[0].startswith("no trained head beats the reference (frozen model) on the "
                                                   "worst-group loss of the validation split")
    # at the largest R and the largest C: both edges, with the extended grid
    notes = selection_notes(s, 1.0, 1.0, "min-accuracy")
    assert len(notes) == 2
    assert "R = 1 is at the edge" in notes[0] and "--radii 0 0.3 1 3 10" in notes[0]
    assert "C = 1 is at the edge" in notes[1] and "--adjustments 0 1 3 10" in notes[1]
    assert extended_grid([0, 0.5, 2]) == [0, 0.5, 2, 6, 20]
    # inside the grid: nothing to say; C = 0 at a one-value C grid is no edge
    assert selection_notes(_scores([(0, 0, 1), (0.3, 0, 1), (1, 0, 1)]), 0.3, 0.0, "worst-loss") == []
    assert set(CRITERIA) == {"worst-loss", "min-accuracy"}


def test_reference_wins_and_edge_notes_from_real_runs(work):
    """A grid of R = 0 and a tiny R: the choice is R = 0 (a tiny step can only tie or barely move) or the
    tiny R at the edge; either way its note is there, from a real selection."""
    problem, _ = wd.load_problem(str(work), seed=0)
    sel = lh.select_head(problem, loss="dpo", radii=[0, 1e-9], adjustments=[0], criterion="worst-loss")
    if sel.radius == 0:
        assert any(n.startswith("no trained head beats the reference") for n in sel.notes)
    else:
        assert any("R = 1e-09 is at the edge" in n for n in sel.notes)
    # choosing on the train split's own objective from the largest radius: the edge of the grid
    big = lh.select_head(problem, loss="dpo", radii=[0.01, 100], adjustments=[0, 4], criterion="worst-loss")
    assert big.scores["chosen"].sum() == 1 and len(big.scores) == 6
    at_edge_r = big.radius == 100
    assert at_edge_r == any("R = 100 is at the edge" in n for n in big.notes)
    assert (big.adjustment == 4 and big.radius > 0) == any("C = 4 is at the edge" in n for n in big.notes)
    assert (big.radius == 0) == any("no trained head beats" in n for n in big.notes)


def test_select_reference_wins_through_the_cli(work, capsys):
    """A grid of R = 0 only: the reference head is the choice, said so, written as a run that evaluate
    reads (θ = θ_ref, a one-row history, an exact certificate)."""
    capsys.readouterr()
    assert cli(["select", "--workdir", str(work), "--radii", "0", "--adjustments", "0", "--run", "ref"]) == 0
    out = capsys.readouterr().out
    assert "no trained head beats the reference (frozen model) on the worst-group loss of the validation split" in out
    settings = _settings(work, "ref")
    assert settings["radius"] == 0 and settings["certificate"]["gap"] == 0 and settings["certificate"]["converged"]
    assert any("no trained head beats" in n for n in settings["selection"]["notes"])
    problem, _ = wd.load_problem(str(work), seed=0)
    assert np.array_equal(np.load(work / "runs" / "ref" / "theta.npy"), problem.theta_ref)
    history = pd.read_csv(work / "runs" / "ref" / "history.csv")
    assert len(history) == 1 and any(c.startswith("alpha/") for c in history.columns)
    assert cli(["evaluate", "--workdir", str(work), "--run", "ref", "--split", "val"]) == 0


@pytest.mark.parametrize("flags, words", [
    (["--radii"], "--radii"),
    (["--radii", "-1", "1"], "--radii"),
    (["--radii", "nan"], "--radii"),
    (["--adjustments", "-0.5"], "--adjustments"),
    (["--criterion", "best"], "--criterion"),
])
def test_bad_grids_name_the_flag(work, flags, words, capsys):
    for command in ("select", "compare"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            cli([command, "--workdir", str(work), *flags])
        err = capsys.readouterr().err + str(info.value.code)
        assert words in err, (command, err)


def test_empty_grid_in_a_config_file_names_the_flag(work, tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text("radii = []\n")
    with pytest.raises(SystemExit, match="--radii: the grid is empty"):
        cli(["select", "--workdir", str(work), "--config", str(config)])
    config.write_text("[compare]\nadjustments = []\n")
    with pytest.raises(SystemExit, match="--adjustments: the grid is empty"):
        cli(["compare", "--workdir", str(work), "--config", str(config)])
    with pytest.raises(ValueError, match="criterion must be one of"):
        lh.select_head(wd.load_problem(str(work), seed=0)[0], criterion="best")


# ============================================================================ compare
def test_compare_end_to_end(work, selected, tmp_path, capsys):
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert cli(["compare", "--workdir", str(work), "--loss", "dpo", "--seeds", "2", *GRID, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 seeds x (2 vanilla + 4 GR solves) = 12 certified solves" in printed
    for name in ("heads.csv", "paired.csv", "report.md", "compare.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for words in ("reference (frozen model)", "vanilla DPO", "GR-DPO", "α*", "95% CI", "Student t over 2 seeds",
                  "On held-out test pairs, GR-DPO changed the worst-group loss by", "better in"):
        assert words in report, words
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["metric"]) == {"worst-group loss", "min-group rewards/accuracies", "mean loss over pairs"}
    assert set(zip(paired["treatment"], paired["baseline"])) == {("group_robust", "vanilla"),
                                                                  ("group_robust", "reference"),
                                                                  ("vanilla", "reference")}
    assert (paired["low"] <= paired["difference"]).all() and (paired["difference"] <= paired["high"]).all()
    heads = pd.read_csv(out / "heads.csv")
    assert set(heads["head"]) == {"reference", "vanilla", "group_robust"} and set(heads["seed"]) == {0, 1}
    # seed 0 of compare is the select run above: same split, same grid, same choice and the same test table
    gr0 = heads[(heads["seed"] == 0) & (heads["head"] == "group_robust")]
    assert gr0["radius"].iloc[0] == selected["radius"] and gr0["adjustment"].iloc[0] == selected["adjustment"]
    test = pd.read_csv(work / "runs" / "sel" / "metrics_test.csv")
    worst = gr0[(gr0["kind"] == "aggregate") & (gr0["group"] == "worst")]["loss"].iloc[0]
    assert worst == pytest.approx(test[(test["kind"] == "aggregate") & (test["group"] == "worst")]["loss"].iloc[0],
                                  rel=1e-6)
    # a paired difference is the difference of the heads' rows, seed by seed
    m = heads[(heads["kind"] == "aggregate") & (heads["group"] == "worst")].pivot(index="seed", columns="head",
                                                                                   values="loss")
    row = paired[(paired["treatment"] == "group_robust") & (paired["baseline"] == "reference")
                 & (paired["metric"] == "worst-group loss")].iloc[0]
    assert row["difference"] == pytest.approx((m["group_robust"] - m["reference"]).mean(), rel=1e-9, abs=1e-12)
    # the reference head is θ_ref: R = 0, nothing solved
    ref = heads[heads["head"] == "reference"]
    assert (ref["radius"] == 0).all() and ref["converged"].all()
    # small test groups are flagged (these groups have a few test pairs each)
    assert "Small test groups" in report and "only " in report


def test_compare_bootstrap_interval(work, tmp_path, capsys):
    comparison = lh.compare_methods(str(work), loss="dpo", seeds=[0, 1], radii=[0, 0.3], adjustments=[0],
                                    interval="bootstrap", progress=False)
    assert set(comparison.paired["interval"]) == {"bootstrap"}
    assert "paired percentile bootstrap over 2 seeds" in comparison.report()
    with pytest.raises(ValueError, match="seeds"):
        lh.compare_methods(str(work), seeds=1, progress=False)


def test_compare_on_a_folder_without_features_says_so_first(tmp_path, capsys):
    """New-user trial: compare printed its plan of solves before saying the features were missing."""
    with pytest.raises(SystemExit, match="extract"):
        cli(["compare", "--workdir", str(tmp_path / "nothing"), "--seeds", "2"])
    assert "certified solves" not in capsys.readouterr().out
