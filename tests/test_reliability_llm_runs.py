"""Issue 18, "Honest certificates and nothing lost": the runs of an llm_head work folder.

Each test is named after its item of the issue: a run is evaluated only against the dataset record
it was trained on (5); a group called ``worst`` or ``mean`` keeps its row (6); ``train --overwrite``
validates before it replaces anything (10); two ``train`` of one name cannot both write it (11); a
failed write leaves no partial run, and partial runs are named and replaceable (12); ``extract``
into a file fails at once (14); every numeric flag is checked and named, settings.json is strict
JSON, a run name is matched whole (16).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

import llm_head as lh  # noqa: E402
import llm_head.__main__ as cli_module  # noqa: E402
import loglinear_grpo as lg  # noqa: E402
from llm_head import extract as ex  # noqa: E402
from llm_head import workdir as wd  # noqa: E402
from llm_head.__main__ import main as cli  # noqa: E402

from conftest import ROOT, make_problem  # noqa: E402
from test_llm_data import _extract, shared_pairs  # noqa: E402,F401  (fixtures; tokenizer and gemma_folder are in conftest)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: a grouping of the same pairs by another column: Egypt and Japan → pool_A, Brazil → pool_B
POOLS = {"Egypt": "pool_A", "Japan": "pool_A", "Brazil": "pool_B"}


def _pairs_file(tmp_path, shared_pairs, **columns):
    """The shared pairs as JSON Lines, with extra columns ``name=function of the group``."""
    frame = shared_pairs.assign(**{name: shared_pairs["group"].map(f) for name, f in columns.items()})
    path = tmp_path / "pairs.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return path


def _train(work, run, *extra):
    return cli(["train", "--workdir", str(work), "--radius", "0.5", "--run", run, *extra])


def _strict_json(path):
    """JSON as the standard has it: NaN and infinities are errors."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    with open(path) as fh:
        return json.loads(fh.read(), parse_constant=refuse)


def _subprocess_env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONDONTWRITEBYTECODE="1", PYTHONWARNINGS="ignore")
    return env


def _run_file(work, run):
    """Every file of a complete run is there and the run checks out."""
    folder = os.path.join(work, "runs", run)
    for name in ("theta.npy", "history.csv", "settings.json", "metrics_train.csv"):
        assert os.path.isfile(os.path.join(folder, name)), name
    settings = _strict_json(os.path.join(folder, "settings.json"))
    assert settings["certificate"]["converged"]
    return folder, settings


# ============================================================================ item 5
def test_item5_a_run_is_evaluated_only_against_its_own_grouping(tmp_path, shared_pairs, gemma_folder):
    data = _pairs_file(tmp_path, shared_pairs, pool=POOLS.get)
    work, other = tmp_path / "work", tmp_path / "other"
    assert _extract(data, work, gemma_folder) == 0
    assert _train(work, "r") == 0
    assert _extract(data, other, gemma_folder, "--group-column", "pool") == 0
    assert wd.features_sha(str(other)) == wd.features_sha(str(work))     # the same pairs: the same features

    # extract: the same features under another grouping is a changed dataset record
    with pytest.raises(SystemExit, match=r"another dataset record.*pool_A.*--force"):
        _extract(data, work, gemma_folder, "--group-column", "pool")
    assert wd.read_dataset(str(work))["groups"] == ["Egypt", "Japan", "Brazil"]     # nothing replaced
    assert cli(["evaluate", "--workdir", str(work), "--run", "r"]) == 0

    # evaluate / export: a dataset.json replaced behind the run's back (as earlier versions did)
    saved = (work / "dataset.json").read_bytes()
    (work / "dataset.json").write_bytes((other / "dataset.json").read_bytes())
    for command in (["evaluate", "--workdir", str(work), "--run", "r"],
                    ["export", "--workdir", str(work), "--run", "r", "--delta-only"]):
        with pytest.raises(SystemExit, match=r"run 'r' was trained on another dataset record .*Egypt.*pool_A"):
            cli(command)
    (work / "dataset.json").write_bytes(saved)
    assert cli(["evaluate", "--workdir", str(work), "--run", "r"]) == 0

    # --force keeps the old runs aside, as for changed features
    assert _extract(data, work, gemma_folder, "--group-column", "pool", "--force") == 0
    kept = [d for d in os.listdir(work) if d.startswith("runs-")]
    assert len(kept) == 1 and os.path.isfile(work / kept[0] / "r" / "settings.json")
    assert wd.existing_runs(str(work)) == []
    with pytest.raises(SystemExit, match="no run 'r'"):
        cli(["evaluate", "--workdir", str(work), "--run", "r"])
    assert _train(work, "p") == 0
    assert _strict_json(work / "runs" / "p" / "settings.json")["groups"] == ["pool_A", "pool_B"]
    assert cli(["evaluate", "--workdir", str(work), "--run", "p"]) == 0


# ============================================================================ item 6
def test_item6_groups_named_worst_and_mean_keep_their_rows(tmp_path, shared_pairs, gemma_folder, monkeypatch):
    base = make_problem()
    data = lg.PreferenceData(base.diff, base.groups, group_names=["worst", "mean", "x"])
    theta = np.full(data.dim, 0.3)
    table = lg.group_metrics(theta, data, "dpo", 0.1, alpha=[0.2, 0.3, 0.5])
    losses = lg.group_losses(theta, data, "dpo", 0.1)
    groups = table.loc["group"]
    assert list(groups.index) == ["worst", "mean", "x"]
    np.testing.assert_allclose(groups["loss"], losses)
    assert list(groups["n_pairs"]) == list(data.group_sizes)
    assert list(table.loc["aggregate"].index) == ["worst", "extreme", "mean over groups", "mean over pairs"]
    assert table.loc[("aggregate", "worst"), "loss"] == pytest.approx(losses.max())
    assert table.loc[("aggregate", "worst"), "worst_group"] == data.group_names[int(np.argmax(losses))]
    assert table.loc[("aggregate", "mean over pairs"), "n_pairs"] == data.n_samples

    # llm_head: the same through extract/train/evaluate, and the figure shows all three groups
    names = {"Egypt": "worst", "Japan": "mean", "Brazil": "other"}
    path = _pairs_file(tmp_path, shared_pairs, pool=names.get)
    work = tmp_path / "work"
    assert _extract(path, work, gemma_folder, "--group-column", "pool") == 0
    assert _train(work, "r") == 0
    drawn = []
    import matplotlib.axes
    real_ticks = matplotlib.axes.Axes.set_xticks

    def set_xticks(self, ticks, labels=None, **kwargs):
        drawn.append([str(v) for v in labels])
        return real_ticks(self, ticks, labels, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", set_xticks)
    assert cli(["evaluate", "--workdir", str(work), "--run", "r", "--split", "train"]) == 0
    assert len(drawn) == 3 and all(labels == ["worst", "mean", "other"] for labels in drawn)
    metrics = pd.read_csv(work / "runs" / "r" / "metrics_train.csv", index_col=["kind", "group"])
    assert list(metrics.index) == [("group", "worst"), ("group", "mean"), ("group", "other"),
                                   ("aggregate", "worst"), ("aggregate", "extreme"),
                                   ("aggregate", "mean over groups"), ("aggregate", "mean over pairs")]
    problem, _ = lh.load_problem(str(work))
    theta = np.load(work / "runs" / "r" / "theta.npy")
    per_group = lg.group_losses(theta, problem.data("train"), "sigmoid", 0.1)
    train_names = list(problem.data("train").group_names)
    np.testing.assert_allclose(metrics.loc["group"].loc[train_names, "loss"], per_group, rtol=1e-9)
    assert metrics.loc[("aggregate", "worst"), "loss"] == pytest.approx(per_group.max(), rel=1e-9)
    assert metrics.loc[("aggregate", "mean over pairs"), "n_pairs"] == problem.data("train").n_samples
    assert metrics.loc[("aggregate", "worst"), "worst_group"] == train_names[int(np.argmax(per_group))]


# ============================================================================ item 10
def test_item10_overwrite_validates_before_it_replaces_the_old_run(tmp_path, shared_pairs, gemma_folder,
                                                                    monkeypatch, capsys):
    data = _pairs_file(tmp_path, shared_pairs)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    assert _train(work, "r") == 0
    folder, settings = _run_file(work, "r")
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}

    def intact():
        assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before
        assert wd.partial_runs(str(work)) == {}

    with pytest.raises(SystemExit):
        _train(work, "r", "--overwrite", "--beta", "-1")
    intact()                                                                  # first: nothing was removed
    assert "argument --beta" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--estimator='closed_form'.*--loss='ipo'"):   # a solver-level refusal
        _train(work, "r", "--overwrite", "--estimator", "closed_form", "--loss", "sigmoid")
    intact()

    def broken(*args, **kwargs):
        raise RuntimeError("the solver failed half-way")
    monkeypatch.setattr(cli_module, "train", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        _train(work, "r", "--overwrite", "--radius", "0.3")
    intact()
    monkeypatch.undo()

    assert _train(work, "r", "--overwrite", "--radius", "0.3") == 0           # a complete new run replaces it
    folder, settings = _run_file(work, "r")
    assert settings["radius"] == 0.3
    assert sorted(os.listdir(work / "runs")) == ["r"]                         # no reservation, no old copy


# ============================================================================ item 11
RACER = textwrap.dedent("""
    import os, sys, time
    import llm_head.__main__ as m
    ready, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real = m.train

    def slow(*args, **kwargs):            # a training long enough for the others to arrive meanwhile
        time.sleep(8)
        return real(*args, **kwargs)
    m.train = slow
    open(os.path.join(ready, str(os.getpid())), "w").close()
    deadline = time.time() + 300
    while len(os.listdir(ready)) < n and time.time() < deadline:    # all start training at once
        time.sleep(0.02)
    sys.exit(m.main(["train", "--workdir", work, "--radius", "0.5", "--run", "same"]))
""")


def test_item11_concurrent_train_same_run(tmp_path, shared_pairs, gemma_folder):
    data = _pairs_file(tmp_path, shared_pairs)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    script, ready = tmp_path / "racer.py", tmp_path / "ready"
    script.write_text(RACER)
    ready.mkdir()
    n = 3
    procs = [subprocess.Popen([sys.executable, str(script), str(ready), str(n), str(work)], cwd=str(ROOT),
                              env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outcomes = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    winners = [o for o in outcomes if o[0] == 0]
    losers = [o for o in outcomes if o[0] != 0]
    assert len(winners) == 1, [o[2][-2000:] for o in outcomes]
    for rc, out, err in losers:
        assert "run 'same' is being trained now by process" in err, err[-2000:]
        assert "Traceback" not in err
    _run_file(work, "same")
    assert wd.existing_runs(str(work)) == ["same"] and wd.partial_runs(str(work)) == {}
    assert sorted(os.listdir(work / "runs")) == ["same"]
    assert cli(["evaluate", "--workdir", str(work), "--run", "same"]) == 0


# ============================================================================ item 12
LIMITED = textwrap.dedent("""
    import resource, sys
    import llm_head.__main__ as m
    limit, work = int(sys.argv[1]), sys.argv[2]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.exit(m.main(["train", "--workdir", work, "--radius", "0.5", "--run", "full"]))
""")


def test_item12_a_failed_write_leaves_no_partial_run(tmp_path, shared_pairs, gemma_folder):
    data = _pairs_file(tmp_path, shared_pairs)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    problem, _ = lh.load_problem(str(work))
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    limit = 8 * problem.features.dim // 2                       # theta.npy cannot be written whole
    proc = subprocess.run([sys.executable, str(script), str(limit), str(work)], cwd=str(ROOT), env=_subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "run 'full' was not written" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert wd.existing_runs(str(work)) == [] and wd.partial_runs(str(work)) == {}
    assert not os.path.lexists(work / "runs" / "full")
    with pytest.raises(SystemExit, match=r"no run 'full' .*runs: \[\]"):
        cli(["evaluate", "--workdir", str(work), "--run", "full"])
    assert _train(work, "full") == 0                             # no --overwrite needed: nothing was left
    _run_file(work, "full")


SLOW = textwrap.dedent("""
    import sys, time
    import llm_head.__main__ as m
    m.train = lambda *args, **kwargs: time.sleep(600)
    sys.exit(m.main(["train", "--workdir", sys.argv[1], "--radius", "0.5", "--run", "killed"]))
""")


def test_item12_partial_runs_are_named_ignored_and_replaceable(tmp_path, shared_pairs, gemma_folder):
    data = _pairs_file(tmp_path, shared_pairs)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    assert _train(work, "good") == 0

    # a run folder without its settings (how earlier versions left a failed write)
    half = work / "runs" / "half"
    half.mkdir()
    (half / "theta.npy").write_bytes(b"\x93NUMPY trunc")
    # the reservation of a train killed mid-way
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, str(script), str(work)], cwd=str(ROOT), env=_subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    owner = work / "runs" / ".train-killed" / "owner.json"
    deadline = time.time() + 300
    while not owner.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert owner.exists()
    with pytest.raises(SystemExit, match=r"run 'killed' is being trained now by process"):
        _train(work, "killed")                                   # while it runs: busy, even with --overwrite
    with pytest.raises(SystemExit, match=r"run 'killed' is being trained now by process"):
        _train(work, "killed", "--overwrite")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    assert wd.existing_runs(str(work)) == ["good"]
    partial = wd.partial_runs(str(work))
    assert set(partial) == {"half", "killed"}
    assert "settings.json" in partial["half"] and "interrupted" in partial["killed"]
    for run, what in (("half", "half-way"), ("killed", "interrupted")):
        with pytest.raises(SystemExit, match=rf"run '{run}' .* is a partial run.*{what}.*--overwrite"):
            cli(["evaluate", "--workdir", str(work), "--run", run])
        with pytest.raises(SystemExit, match=rf"run '{run}' .*partial run.*{what}.*--overwrite"):
            _train(work, run)
    with pytest.raises(SystemExit, match=r"no run 'other' .*runs: \['good'\].*'half'.*'killed'"):
        cli(["evaluate", "--workdir", str(work), "--run", "other"])
    for run in ("half", "killed"):
        assert _train(work, run, "--overwrite") == 0
        _run_file(work, run)
    assert wd.partial_runs(str(work)) == {}
    assert sorted(os.listdir(work / "runs")) == ["good", "half", "killed"]


# ============================================================================ item 14
def test_item14_extract_into_a_file_fails_before_the_model_loads(tmp_path, shared_pairs, monkeypatch):
    data = _pairs_file(tmp_path, shared_pairs)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the work folder was checked")
    monkeypatch.setattr(ex, "load_model", no_model)
    args = ["extract", "--data", str(data), "--model", "unused"]
    with pytest.raises(SystemExit, match=rf"^llm_head extract: --workdir {afile} is a file, not a folder$"):
        cli([*args, "--workdir", str(afile)])
    with pytest.raises(SystemExit, match=rf"--workdir {afile}/sub cannot be made: {afile} is a file"):
        cli([*args, "--workdir", str(afile / "sub")])
    with pytest.raises(SystemExit, match=rf"--cache-dir {afile} is a file"):
        cli([*args, "--workdir", str(tmp_path / "w"), "--cache-dir", str(afile)])


# ============================================================================ item 16
@pytest.mark.parametrize("argv, flag", [
    (["train", "--tol", "nan"], "--tol"), (["train", "--tol", "-1"], "--tol"), (["train", "--tol", "inf"], "--tol"),
    (["train", "--seed", "-1"], "--seed"), (["train", "--seed", "1.5"], "--seed"),
    (["train", "--beta", "nan"], "--beta"), (["train", "--beta", "0"], "--beta"),
    (["train", "--radius", "-1"], "--radius"), (["train", "--radius", "inf"], "--radius"),
    (["train", "--chi", "1.5"], "--chi"), (["train", "--chi", "nan"], "--chi"), (["train", "--steps", "0"], "--steps"),
    (["train", "--step-size", "-0.1"], "--step-size"), (["train", "--step-size", "fast"], "--step-size"),
    (["train", "--step-size", "nan/sqrt(t)"], "--step-size"),
    (["train", "--alpha-step-size", "0"], "--alpha-step-size"),
    (["extract", "--limit", "0"], "--limit"), (["extract", "--batch-size", "x"], "--batch-size"),
    (["extract", "--shard-items", "-3"], "--shard-items"),
])
def test_item16_every_numeric_flag_is_checked_and_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_module.parse_args(argv)
    assert raised.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_item16_valid_values_config_file_settings_json_and_run_names(tmp_path, shared_pairs, gemma_folder, capsys):
    args = cli_module.parse_args(["train", "--tol", "0", "--seed", "0", "--chi", "0.5", "--step-size", "0.5",
                                  "--alpha-step-size", "2/sqrt(t)", "--beta", "1e-3"])
    assert (args.tol, args.seed, args.chi, args.step_size, args.alpha_step_size, args.beta) == \
        (0.0, 0, 0.5, 0.5, "2/sqrt(t)", 1e-3)
    assert cli_module.parse_args(["train", "--step-size", "theory", "--alpha-step-size", "auto"]).step_size == "theory"
    for text, flag in (("tol = nan", "--tol"), ("seed = -1", "--seed"), ("beta = inf", "--beta"),
                       ('loss = "kto"', "--loss")):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[train]\n{text}\n")
        with pytest.raises(SystemExit):
            cli_module.parse_args(["train", "--config", str(bad)])
        assert f"{bad}: {flag}" in capsys.readouterr().err

    with pytest.raises(ValueError, match="plain name"):
        wd.check_run_name("r\n")
    data = _pairs_file(tmp_path, shared_pairs)
    work = tmp_path / "work"
    assert _extract(data, work, gemma_folder) == 0
    with pytest.raises(SystemExit, match="plain name"):
        _train(work, "r\n")
    assert wd.existing_runs(str(work)) == [] and not os.path.isdir(work / "runs" / "r\n")
    good = tmp_path / "good.toml"
    good.write_text("[train]\ntol = 1e-7\nseed = 1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["train", "--config", str(good), "--workdir", str(work), "--radius", "0.5", "--run", "r"]) == 0
    settings = _strict_json(work / "runs" / "r" / "settings.json")
    assert settings["tol"] == 1e-7 and settings["seed"] == 1
