"""llm_head with several groupings: ``--group-columns`` (their union: overlapping groups) and ``--intersect``
(their cells), from TRL-format pairs with several group columns, through extract, train, evaluate, compare.

Real data: the shared GlobalOpinionQA TRL pairs (country), with the survey each question comes from (Pew's
GAS or the WVS, the ``source`` column of the shared CSV) as a second grouping. Model: the tiny random Gemma
of ``conftest`` (the real architecture), so the features are cheap; nothing touches the network.
"""
import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest

import loglinear_grpo as lg
from llm_head.data import load_preference_pairs, pairs_from_frame

from conftest import GLOBAL_OPINIONS, SHARED

PAIRS = SHARED / "data" / "global_opinions_pairs.jsonl"
COUNTRIES = ["China", "Nigeria", "Brazil", "Japan"]


def survey_pairs(per_country=60):
    """The shared pairs of four countries, with their survey: columns ``country`` and ``survey``."""
    frame = pd.read_json(PAIRS, lines=True, dtype=False)
    source = pd.read_csv(GLOBAL_OPINIONS)["source"].to_numpy()
    frame["survey"] = source[frame["question_id"].to_numpy()]
    frame = frame.rename(columns={"group": "country"})
    return frame[frame["country"].isin(COUNTRIES)].groupby("country").head(per_country).reset_index(drop=True)


def toy_frame():
    rows = []
    for i in range(24):
        rows.append({"prompt": f"q{i % 6}", "chosen": f"a{i}", "rejected": f"b{i}",
                     "country": ["Kenya", "Peru", "Chile"][i % 3], "age": ["18-24", "65+"][i % 2]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- reading several group columns
def test_union_of_group_columns():
    frame = toy_frame()
    frame.loc[5, "age"] = None                      # a pair without an age band: a bad row, by its column
    frame.loc[7, "country"] = ""
    pairs = pairs_from_frame(frame, group_column=["country", "age"])
    assert pairs.union == ("country", "age") and not pairs.intersect
    assert pairs.groups == ("country=Kenya", "country=Peru", "country=Chile", "age=18-24", "age=65+")
    assert "group" not in pairs.table.columns
    assert dict(zip(pairs.skipped["row"], pairs.skipped["reason"])) == {5: "age: missing group",
                                                                         7: "country: empty group"}
    sizes = pairs.group_sizes()
    assert sizes["country=Kenya"] == 8 and sizes["country=Peru"] == 7 and sizes["age=65+"] == 10
    assert sizes.loc[["age=18-24", "age=65+"]].sum() == len(pairs) == 22   # each pair once per grouping
    assert "5 overlapping groups, the union of 2 groupings" in pairs.report()


def test_numbers_are_named_like_labels_in_every_grouping():
    frame = toy_frame().assign(age=[18.0, 65] * 12)
    pairs = pairs_from_frame(frame, group_column=["country", "age"])
    assert pairs.groups[-2:] == ("age=18", "age=65")


def test_intersection_cells_small_ones_kept_merged_or_dropped():
    frame = toy_frame()
    frame.loc[frame.index[:4], "country"] = "Togo"    # Togo has 4 pairs: two cells of 2
    keep = pairs_from_frame(frame, group_column=["country", "age"], intersect=True, min_group_size=3)
    assert keep.intersect and keep.union == () and keep.groupings == ("country", "age")
    assert "country=Togo & age=18-24" in keep.groups and set(keep.table["group"]) == set(keep.groups)
    assert keep.small_cells == {"country=Togo & age=18-24": 2, "country=Togo & age=65+": 2}
    assert "2 cell(s) below the minimum size" in keep.report()
    merged = pairs_from_frame(frame, group_column=["country", "age"], intersect=True, min_group_size=3,
                              small_groups="merge")
    assert merged.groups[-1] == "other (cells < 3)" and merged.group_sizes()["other (cells < 3)"] == 4
    dropped = pairs_from_frame(frame, group_column=["country", "age"], intersect=True, min_group_size=3,
                               small_groups="drop")
    assert len(dropped) == 20 and not any("Togo" in g for g in dropped.groups)
    assert list(dropped.skipped["row"]) == [0, 1, 2, 3]
    assert dropped.skipped["reason"].str.startswith("small cell").all()
    assert "dropped the 4 pairs of the small cells" in dropped.report() and "bad rows" not in dropped.report()


def test_several_group_columns_refuse_what_does_not_apply():
    frame = toy_frame()
    with pytest.raises(ValueError, match="select the rows"):
        pairs_from_frame(frame, group_column=["country", "age"], groups=["country=Kenya"])
    with pytest.raises(ValueError, match="at least two group columns"):
        pairs_from_frame(frame, group_column="country", intersect=True)
    with pytest.raises(ValueError, match="apply to an intersection"):
        pairs_from_frame(frame, group_column=["country", "age"], min_group_size=5)
    with pytest.raises(ValueError, match="named twice"):
        pairs_from_frame(frame, group_column=["country", "country"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['agee'\]"):
        pairs_from_frame(frame, group_column=["country", "agee"])
    with pytest.raises(ValueError, match="grouped by country"):
        load_preference_pairs(str(GLOBAL_OPINIONS), group_column=["country", "source"])


def test_review_fixes_limit_names_and_one_column_inputs():
    frame = survey_pairs(per_country=200)
    # --limit with --intersect: the first `limit` of each cell, *then* the small cells (all below 30 here)
    cells = load_preference_pairs(frame, group_column=["country", "survey"], intersect=True, min_group_size=40,
                                  small_groups="merge", limit=50)        # Japan x WVS has 33 pairs, the rest >= 60
    assert cells.small_cells == {"country=Japan & survey=WVS": 33}
    sizes = cells.group_sizes()
    assert sizes["other (cells < 40)"] == 33 and (sizes.drop("other (cells < 40)") == 50).all() and len(sizes) == 8
    with pytest.raises(ValueError, match=r"limit=20 \(--limit\) keeps at most 20 pairs of each cell"):
        load_preference_pairs(frame, group_column=["country", "survey"], intersect=True, min_group_size=40,
                              small_groups="merge", limit=20)
    kept = load_preference_pairs(frame, group_column=["country", "survey"], intersect=True, min_group_size=40,
                                 limit=20)          # keep: every cell kept (and reported), as asked
    assert len(kept.small_cells) == 8 and (kept.group_sizes() == 20).all()
    # a grouping name holding "=" could collide with another's group names: refused (llm_head and the core)
    bad = toy_frame().rename(columns={"age": "age=band"})
    with pytest.raises(ValueError, match="may not hold '='"):
        pairs_from_frame(bad, group_column=["country", "age=band"])
    with pytest.raises(ValueError, match="may not hold '='"):
        lg.PreferenceData(np.ones((4, 2)), {"a=b": [0, 0, 1, 1], "a": ["x", "y", "x", "y"]})
    # one column: any column name as before, and "split"-named columns are not refused
    numbered = toy_frame().rename(columns={"country": 0})
    assert pairs_from_frame(numbered, group_column=0).groups == ("Kenya", "Peru", "Chile")
    assert load_preference_pairs(str(GLOBAL_OPINIONS), group_column=["country"], limit=2).groups  # a list of one
    # a ragged list of groupings gets the labels' own message, not numpy's
    with pytest.raises(ValueError, match="1-D array of group labels"):
        lg.PreferenceData(np.ones((6, 2)), [np.array(list("aabbcc")), np.array(list("xyxyx"))])


def test_limit_keeps_at_least_limit_pairs_of_every_overlapping_group():
    frame = survey_pairs(per_country=200)
    full = pairs_from_frame(frame, group_column=["country", "survey"]).group_sizes()
    limited = load_preference_pairs(frame, group_column=["country", "survey"], limit=25)
    sizes = limited.group_sizes()
    assert (sizes >= np.minimum(25, full)).all()
    assert (limited.table.groupby("country").size() >= 25).all() and len(limited) < len(frame)


# ---------------------------------------------------------------- through the work folder (tiny Gemma)
@pytest.fixture(scope="module")
def union_work(gemma_folder, tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llm_head.__main__ import main as cli
    tmp = tmp_path_factory.mktemp("overlap-llm")
    data = tmp / "pairs.jsonl"
    survey_pairs().to_json(data, orient="records", lines=True)
    work = str(tmp / "work")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["extract", "--data", str(data), "--model", gemma_folder, "--workdir", work, "--device", "cpu",
                    "--group-columns", "country", "survey", "--split-by", "question_id"]) == 0
    return work, data


def test_head_problem_of_the_union_is_the_core_overlapping_problem(union_work):
    from llm_head.train import evaluate
    from llm_head.workdir import load_problem, pairs_for_seed, read_dataset
    work, _ = union_work
    problem, record = load_problem(work, seed=1)
    assert record["groupings"] == ["country", "survey"] and record["intersect"] is False
    assert problem.union == ("country", "survey")
    assert list(problem.groupings()) == ["country", "survey"]
    data = problem.data("train")
    assert data.overlapping and data.groups is None
    table = pairs_for_seed(read_dataset(work), seed=1).table
    train = table[table["split"] == "train"]
    core = lg.PreferenceData(data.diff, {"country": train["country"].to_numpy(), "survey": train["survey"].to_numpy()},
                             data.ref_margin)
    assert sorted(core.group_names) == sorted(data.group_names)
    order = [core.group_names.index(g) for g in data.group_names]
    np.testing.assert_array_equal(core.group_sizes[order], data.group_sizes)
    kw = dict(loss="dpo", beta=0.1, radius=0.5, center=problem.theta_ref, tol=1e-7)
    ours, theirs = lg.solve(data, **kw), lg.solve(core, **kw)
    assert ours.converged and theirs.converged
    assert ours.value == pytest.approx(theirs.value, rel=1e-6)
    np.testing.assert_allclose(ours.alpha, np.asarray(theirs.alpha)[order], atol=1e-4)

    metrics = evaluate(problem, ours.theta, "dpo", 0.1, "test")
    test = problem.data("test")
    groups = metrics.loc["group"]
    assert list(groups["grouping"]) == [g.split("=")[0] for g in groups.index]
    agg = metrics.loc["aggregate"]
    assert int(agg.loc["mean over pairs", "n_pairs"]) == test.n_samples       # every pair once
    assert int(groups["n_pairs"].sum()) == 2 * test.n_samples                  # once in each grouping
    h = test.matvec(ours.theta) - test.ref_margin
    assert agg.loc["mean over pairs", "rewards/accuracies"] == pytest.approx(np.mean(h > 0))
    for grouping in ("country", "survey"):
        part = groups[groups["grouping"] == grouping]
        assert agg.loc[f"worst {grouping}", "worst_group"] == part["loss"].idxmax()
        assert agg.loc[f"worst {grouping}", "loss"] == part["loss"].max()
    assert agg.loc["worst", "loss"] == groups["loss"].max()
    member = test.membership.column(test.group_names.index("survey=GAS")).astype(bool)
    assert groups.loc["survey=GAS", "logps/accuracies"] == pytest.approx(np.mean(test.matvec(ours.theta)[member] > 0))


def test_cli_union_train_evaluate_compare(union_work):
    from llm_head.__main__ import main as cli
    work, _ = union_work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["train", "--workdir", work, "--run", "u", "--radius", "0.5"]) == 0
        assert cli(["evaluate", "--workdir", work, "--run", "u"]) == 0
        assert cli(["compare", "--workdir", work, "--seeds", "2", "--radii", "0.5", "--adjustments", "0"]) == 0
    run = os.path.join(work, "runs", "u")
    with open(os.path.join(run, "settings.json")) as fh:
        settings = json.load(fh)
    assert settings["certificate"]["converged"] and settings["certificate"]["relative_gap"] <= 1e-6
    assert sorted(settings["alpha_star"]) == sorted(f"country={c}" for c in COUNTRIES) + ["survey=GAS", "survey=WVS"]
    metrics = pd.read_csv(os.path.join(run, "metrics_test.csv"), index_col=["kind", "group"])
    assert ("aggregate", "worst country") in metrics.index and ("aggregate", "worst survey") in metrics.index
    assert set(metrics.loc["group", "grouping"]) == {"country", "survey"}
    assert os.path.exists(os.path.join(run, "groups.png"))
    out = os.path.join(work, "compare", "sigmoid")
    paired = pd.read_csv(os.path.join(out, "paired.csv"))
    assert {"worst country loss", "worst survey loss", "worst-group loss"} <= set(paired["metric"])
    report = open(os.path.join(out, "report.md")).read()
    assert "changed the worst survey loss" in report and "changed the worst country loss" in report
    assert os.path.exists(os.path.join(out, "compare.png"))


def test_compare_says_when_nothing_was_compared_and_names_ties(union_work, tmp_path):
    """With R = 0 only, every head is the frozen model: compare says so first, and the worst group of a tie
    (every group's loss is log 2) is 'tie: k groups', not the first group of the file."""
    import warnings as w
    from llm_head.__main__ import _warning_line, main as cli
    from llm_head.compare import FROZEN_NOTE
    work, _ = union_work
    before = w.formatwarning
    with w.catch_warnings():
        w.simplefilter("ignore")
        assert cli(["compare", "--workdir", work, "--seeds", "2", "--radii", "0", "--adjustments", "0",
                    "--out", str(tmp_path / "c")]) == 0
    assert w.formatwarning is before                      # the command's warning format does not leak
    assert _warning_line("no pairs", UserWarning, "x.py", 3) == "warning (UserWarning): no pairs\n"
    report = (tmp_path / "c" / "report.md").read_text()
    assert FROZEN_NOTE in report and "holds only R = 0" in report
    heads = pd.read_csv(tmp_path / "c" / "heads.csv")
    assert set(heads.loc[heads["group"] == "worst", "worst_group"]) == {"tie: 6 groups"}   # as in report.md
    assert "| tie: 6 groups (2 of 2 seeds) | tie: 4 groups (2 of 2 seeds) | tie: 2 groups (2 of 2 seeds) |" in report
    from llm_head import select_head
    from llm_head.workdir import load_problem
    with w.catch_warnings():
        w.simplefilter("ignore")
        sel = select_head(load_problem(work)[0], radii=[0.0], adjustments=[0.0], progress=False)
    assert list(sel.scores["val_worst_group"]) == ["tie: 6 groups"]          # select's table says so too


def test_cli_intersection(union_work, gemma_folder, tmp_path):
    from llm_head.__main__ import main as cli
    from llm_head.workdir import load_problem
    _, data = union_work
    work = str(tmp_path / "cells")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["extract", "--data", str(data), "--model", gemma_folder, "--workdir", work, "--device", "cpu",
                    "--group-columns", "country", "survey", "--intersect", "--min-group-size", "30",
                    "--small-groups", "merge"]) == 0
        assert cli(["train", "--workdir", work, "--run", "c", "--radius", "0.5"]) == 0
    problem, record = load_problem(work)
    assert record["intersect"] is True and record["small_cells"]
    assert problem.union == () and "other (cells < 30)" in problem.group_names
    assert all(" & survey=" in g for g in problem.group_names[:-1])
    with open(os.path.join(work, "runs", "c", "settings.json")) as fh:
        assert json.load(fh)["certificate"]["converged"]


#: dataset_sha of the record below, computed by the code before several groupings existed (commit 1bc19c9)
ONE_COLUMN_SHA = "418fb18f4a0b47af00a22d8fb7aed59346690d04f46087d73b630e99437af50a"


def test_one_group_column_keeps_its_record_and_checksum():
    """A record of one group column is what it was (its checksum pinned from the code before several
    groupings: older work folders, and the runs trained on them, stay valid); the same pairs under the union
    of two groupings have another one."""
    from llm_head.data import items_from_pairs
    from llm_head.extract import Rendering
    from llm_head.workdir import dataset_record, dataset_sha
    frame = survey_pairs(per_country=10)
    pinned = load_preference_pairs(frame, group_column="country", limit=7)
    record = dataset_record(pinned, items_from_pairs(pinned), Rendering(chat_template=False, add_eos=True), "pairs")
    assert dataset_sha(record) == ONE_COLUMN_SHA
    one = load_preference_pairs(frame, group_column="country")
    two = load_preference_pairs(frame, group_column=["country", "survey"])
    rendering = Rendering(chat_template=False, add_eos=True)
    rec_one = dataset_record(one, items_from_pairs(one), rendering, "pairs")
    rec_two = dataset_record(two, items_from_pairs(two), rendering, "pairs")
    assert not {"groupings", "intersect", "small_cells"} & set(rec_one)
    assert dataset_sha(rec_one) != dataset_sha(rec_two)
