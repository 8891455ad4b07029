"""Did group robustness help the worst group, on held-out data? (:func:`compare_methods`)

For every seed (a redrawn train/val/test split of the work folder, :func:`llm_head.workdir.load_problem`)
three heads are evaluated on the test split:

* ``reference`` — θ_ref, the frozen model (nothing trained);
* ``vanilla`` — the mean loss over pairs, its radius R chosen on the validation split
  (:func:`llm_head.select.select_head`);
* ``group_robust`` — the worst group's loss, its R and group adjustment C chosen on the validation split.

Both trained heads have R = 0 (the reference) on their grid, so either can fall back to the frozen
model. The three heads are then compared as a paired experiment over the seeds
(:func:`loglinear_grpo.inference.paired_comparison`) on the worst-group loss, the min-group
rewards/accuracies and the mean loss over pairs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from loglinear_grpo.inference import MIN_GROUP_PAIRS, paired_comparison, paired_interval, small_group_note

from . import workdir as wd
from .plots import group_axis
from .train import worst_group_name
from .select import (C_FREE_METHODS, CRITERIA, DEFAULT_ADJUSTMENTS, DEFAULT_RADII, check_criterion, check_grid,
                     score_table, select_head)

#: the heads, in the order of every table
HEADS = ("reference", "vanilla", "group_robust")
#: the metrics compared over seeds: (aggregate row, column of evaluate's table), higher is better
METRICS = {
    "worst-group loss": ("worst", "loss", False),
    "min-group rewards/accuracies": ("extreme", "rewards/accuracies", True),
    "mean loss over pairs": ("mean over pairs", "loss", False),
}
#: the paired comparisons, treatment − baseline
PAIRS = (("group_robust", "vanilla"), ("group_robust", "reference"), ("vanilla", "reference"))


def metric_specs(groupings=()):
    """The compared metrics: :data:`METRICS`, and for the union of several groupings (``groupings``, as
    :attr:`llm_head.train.HeadProblem.union`) each grouping's worst-group loss, ``"worst <grouping> loss"``
    (the ``worst <grouping>`` row of :func:`llm_head.train.evaluate`), so that the worst country and the
    worst age band are each compared across heads."""
    return dict(METRICS) | {f"worst {g} loss": (f"worst {g}", "loss", False) for g in groupings}


#: what compare says first when both trained heads are the frozen model in every seed
FROZEN_NOTE = ("note: both trained heads chose R = 0 (the frozen model) in every seed, so the three heads are the "
               "same model and every difference below is 0: nothing was compared.")
#: why, after FROZEN_NOTE: the grid had R > 0 (and validation kept R = 0), or it had none
FROZEN_WHY = {True: " On the validation split no trained head beat the frozen model; more pairs (or more of them "
                    "per group) are needed.",
              False: " The grid of radii holds only R = 0: give --radii > 0."}

#: the metric of the plain sentences for each criterion
CRITERION_METRIC = {"worst-loss": "worst-group loss", "min-accuracy": "min-group rewards/accuracies"}


def loss_label(loss):
    """``"DPO"`` for dpo/sigmoid, ``"IPO"``, ``"hinge"``."""
    return {"dpo": "DPO", "sigmoid": "DPO", "ipo": "IPO"}.get(loss, loss)


def head_label(head, loss):
    """How a head is named in the report: ``reference``, ``vanilla DPO``, ``GR-DPO``."""
    return {"reference": "reference (frozen model)", "vanilla": f"vanilla {loss_label(loss)}",
            "group_robust": f"GR-{loss_label(loss)}"}[head]


@dataclass
class Comparison:
    """What :func:`compare_methods` returns.

    Attributes
    ----------
    heads : pandas.DataFrame
        Long: one row per (seed, head, kind, group) of the test table (:func:`llm_head.train.evaluate`),
        with the head's chosen ``radius`` and ``adjustment``, its validation ``val_score``, ``converged``
        and ``gap``, then the test metrics of that group or aggregate row.
    metrics : pandas.DataFrame
        One row per (seed, head): the three compared metrics (:data:`METRICS`) on the test split, the
        worst test group, R, C, the validation score.
    paired : pandas.DataFrame
        One row per (comparison, metric): ``treatment``, ``baseline`` and the columns of
        :func:`loglinear_grpo.inference.paired_comparison`.
    alpha : pandas.DataFrame
        GR's α* (the certificate's group weights on the train split): rows seeds, columns groups.
    small_groups : dict
        {group: note} for the groups with fewer than ``MIN_GROUP_PAIRS`` test pairs in some seed.
    notes : list of str
        The selections' notes, by seed and head.
    tables : dict
        {(seed, head): the test table}.
    """

    heads: pd.DataFrame
    metrics: pd.DataFrame
    paired: pd.DataFrame
    alpha: pd.DataFrame
    small_groups: dict
    notes: list
    tables: dict = field(repr=False)
    loss: str = "dpo"
    criterion: str = "worst-loss"
    interval: str = "t"
    level: float = 0.95
    seeds: list = field(default_factory=list)
    radii: list = field(default_factory=list)
    adjustments: list = field(default_factory=list)
    workdir: str = ""
    group_names: list = field(default_factory=list)
    metric_specs: dict = field(default_factory=lambda: dict(METRICS))
    groupings: tuple = ()

    # ------------------------------------------------------------------ text
    def interval_words(self):
        """``"t over 3 seeds"`` or ``"paired bootstrap over 3 seeds"``."""
        how = "Student t" if self.interval == "t" else "paired percentile bootstrap"
        return f"{how} over {len(self.seeds)} seeds"

    def sentences(self):
        """One plain sentence per comparison, on the criterion's metric (and, for the union of several
        groupings, on each grouping's worst-group loss)."""
        out = []
        for metric in [CRITERION_METRIC[self.criterion]] + [f"worst {g} loss" for g in self.groupings]:
            out += self._sentences(metric)
        return out

    def _sentences(self, metric):
        higher = self.metric_specs[metric][2]
        out = []
        for treatment, baseline in PAIRS:
            row = self._paired_row(treatment, baseline, metric)
            ci = _interval(row)
            if not ci.excludes_zero:
                verdict = f"no significant difference from {head_label(baseline, self.loss)}"
            else:
                better = (ci.estimate > 0) == higher
                verdict = (f"significantly {'better' if better else 'worse'} than "
                           f"{head_label(baseline, self.loss)} ({_level(self.level)} interval excludes 0)")
            out.append(f"On held-out test pairs, {head_label(treatment, self.loss)} changed the {metric} by "
                       f"{ci.describe(3)}: {verdict}; {head_label(treatment, self.loss)} was better in "
                       f"{int(row['treatment_better'])} of {int(row['n_seeds'])} seeds.")
        return out

    def _paired_row(self, treatment, baseline, metric):
        p = self.paired
        return p[(p["treatment"] == treatment) & (p["baseline"] == baseline) & (p["metric"] == metric)].iloc[0]

    def summary(self):
        """The lines compare prints: the heads' means and the sentences."""
        lines = [f"test split, {len(self.seeds)} seeds ({self.interval_words()} intervals):"]
        lines.append(self.head_table().to_string(index=False))
        if self.frozen_everywhere():
            lines.append(self.frozen_note())
        lines += self.sentences()
        lines += [f"note: group {g}: {n}" for g, n in self.small_groups.items()]
        return "\n".join(lines)

    def head_table(self):
        """One row per head: mean and interval over seeds of every metric, the most frequent worst test
        group."""
        rows = []
        for head in HEADS:
            part = self.metrics[self.metrics["head"] == head]
            row = {"head": head_label(head, self.loss)}
            for metric in self.metric_specs:
                values = part[metric].to_numpy(dtype=float)
                ci = paired_interval(values, level=self.level, method=self.interval)
                low, high = ci.low, ci.high
                if "accuracies" in metric:                    # a share: its interval clipped to [0, 1]
                    low, high = max(0.0, low), min(1.0, high)
                row[metric] = f"{ci.estimate:.4f} [{low:.4f}, {high:.4f}]"
            for column, label in [("worst_group", "most frequent worst test group")] + [
                    (f"worst_group/{g}", f"most frequent worst {g}") for g in self.groupings]:
                worst = part[column].value_counts()
                top = worst[worst == worst.max()].index
                top = [g for g in self.group_names if g in set(top)] or list(top)
                row[label] = f"{top[0]} ({int(worst.max())} of {len(part)} seeds)"
            rows.append(row)
        return pd.DataFrame(rows)

    def frozen_note(self):
        """What compare says first when :meth:`frozen_everywhere`: why, by the grid."""
        return FROZEN_NOTE + FROZEN_WHY[any(r > 0 for r in self.radii)]

    def frozen_everywhere(self):
        """True when both trained heads chose R = 0 (the frozen model) in every seed: nothing was compared."""
        trained = self.metrics[self.metrics["head"] != "reference"]
        return bool(len(trained)) and bool((trained["radius"] == 0).all())

    def report(self):
        """``report.md``: the heads, the choices per seed, GR's α*, the paired differences and how to
        read them."""
        lvl = _level(self.level)
        lines = [f"# Did group robustness help the worst group? ({loss_label(self.loss)}, {self.workdir})", "",
                 f"Heads on held-out **test** pairs over {len(self.seeds)} seeds (seeds {_join(self.seeds)}; each "
                 "seed redraws the train/val/test split). Each trained head chose its radius R (and GR its "
                 f"adjustment C) on the **validation** split by the {CRITERIA[self.criterion].words} "
                 f"(`--criterion {self.criterion}`), from R in [{_join(self.radii)}] "
                 f"and, for GR, C in [{_join(self.adjustments)}]; R = 0 is the reference head (the frozen model).",
                 f"Intervals: {lvl}, {self.interval_words()}"
                 + (" (t interval of the mean over seeds, accuracies' clipped to [0, 1]; for the paired rows, of the "
                    "per-seed differences)."
                    if self.interval == "t" else " (percentile bootstrap over the seeds)."), "",
                 f"## Heads on the test split (mean and {lvl} interval over seeds)", ""]
        table = self.head_table()
        if self.frozen_everywhere():
            lines += [f"**{self.frozen_note()}**", ""]
        lines += _markdown(table)
        lines += ["", "## Chosen regularisation per seed (on the validation split)", ""]
        chosen = []
        for seed in self.seeds:
            m = self.metrics[self.metrics["seed"] == seed].set_index("head")
            chosen.append({"seed": seed, "vanilla R": f"{m.loc['vanilla', 'radius']:g}",
                           "vanilla val score": f"{m.loc['vanilla', 'val_score']:.4f}",
                           "GR R": f"{m.loc['group_robust', 'radius']:g}",
                           "GR C": f"{m.loc['group_robust', 'adjustment']:g}",
                           "GR val score": f"{m.loc['group_robust', 'val_score']:.4f}",
                           "reference val score": f"{m.loc['reference', 'val_score']:.4f}",
                           "GR converged": bool(m.loc["group_robust", "converged"])})
        lines += _markdown(pd.DataFrame(chosen))
        lines += ["", "## GR's α* (the certificate's optimal group weights, train split)", ""]
        alpha = self.alpha
        arows = [{"group": g, "α* mean over seeds": f"{alpha[g].mean():.3f}",
                  "per seed": ", ".join("—" if not np.isfinite(a) else f"{a:.3f}" for a in alpha[g])}
                 for g in alpha.columns]
        lines += _markdown(pd.DataFrame(arows))
        lines += ["", f"Uniform weights would be 1/K = {1 / max(1, alpha.shape[1]):.3f}. A weight near 1 on one group: "
                  "the robust head spends its whole budget on that group. For a seed where GR chose R = 0 the "
                  "weights are the reference point's, where every group has the same loss (the loss at margin 0: "
                  "log 2 for DPO): any weights are optimal there, so read nothing into them.", "",
                  "`rewards/accuracies` counts a tie as wrong (TRL's definition). The reference head's margins "
                  "are all 0, so its accuracy is 0 by construction: read accuracy differences between trained "
                  "heads, not against the reference (whose losses are the meaningful comparison).", "",
                  f"## Paired differences on the test split (treatment − baseline, {lvl} interval)", ""]
        prow = []
        for _, r in self.paired.iterrows():
            higher = self.metric_specs[r["metric"]][2]
            prow.append({"comparison": f"{head_label(r['treatment'], self.loss)} − {head_label(r['baseline'], self.loss)}",
                         "metric": r["metric"] + (" (higher is better)" if higher else " (lower is better)"),
                         "difference": _signed(r["difference"]),
                         f"{lvl} CI": f"{_signed(r['low'])} to {_signed(r['high'])}",
                         "better in": f"{head_label(r['treatment'], self.loss)} better in {int(r['treatment_better'])} "
                                      f"of {int(r['n_seeds'])} seeds",
                         "per seed": ", ".join(_signed(d) for d in r["per_seed"])})
        lines += _markdown(pd.DataFrame(prow))
        lines += ["", "## In words", ""] + [f"- {s}" for s in self.sentences()]
        lines += ["", "## Small test groups", ""]
        if self.small_groups:
            lines += [f"- **{g}**: {n}" for g, n in self.small_groups.items()]
            lines += ["", f"Groups with fewer than {MIN_GROUP_PAIRS} test pairs: their accuracies (and so the min-group "
                      "accuracy, when one of them is the minimum) are noisy; a difference smaller than the "
                      "interval above is not evidence."]
        else:
            lines.append(f"Every group has at least {MIN_GROUP_PAIRS} test pairs in every seed.")
        if self.notes:
            lines += ["", "## Notes of the selections", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "## How to read this", "",
                  "- A paired difference is the mean over seeds of (treatment − baseline) on the same split: "
                  "a loss difference below 0, or an accuracy difference above 0, favours the treatment.",
                  f"- If the {lvl} interval contains 0, the seeds do not show a difference; with few seeds the "
                  "interval is wide — add seeds (`--seeds`) before concluding.",
                  "- `GR-… − reference` and `vanilla … − reference` say whether training the head helps at all; "
                  "a head that chose R = 0 *is* the reference for that seed (difference 0).",
                  "- A chosen R or C at the largest value of its grid is flagged in the notes: extend the grid."]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ files
    def write(self, out):
        """Write ``heads.csv``, ``paired.csv``, ``report.md`` and ``compare.png`` into ``out``; returns their
        paths."""
        os.makedirs(out, exist_ok=True)
        paths = [os.path.join(out, f) for f in ("heads.csv", "paired.csv", "report.md", "compare.png")]
        self.heads.to_csv(paths[0], index=False)
        paired = self.paired.copy()
        paired["per_seed"] = [" ".join(f"{d:.10g}" for d in v) for v in paired["per_seed"]]
        paired.to_csv(paths[1], index=False)
        with open(paths[2], "w") as fh:
            fh.write(self.report())
        self.plot(paths[3])
        return paths

    def plot(self, path):
        """``compare.png``: per-group test loss of the three heads (mean over seeds, the seeds as dots),
        GR's α* (mean over seeds), and the paired differences with their interval bars. Groups in rows
        of their own when there are many."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(self.group_names)
        k = len(names)
        x = np.arange(k)
        groups = self.heads[self.heads["kind"] == "group"]
        marks = None
        if "grouping" in groups.columns:              # overlapping groups: marked by grouping
            of = groups.drop_duplicates("group").set_index("group")["grouping"]
            marks = [str(of.get(n, "")) for n in names]
        specs = self.metric_specs
        wide = max(12.0, 0.55 * k + 3, 4.2 * len(specs))
        fig = plt.figure(figsize=(wide, 11))
        grid = fig.add_gridspec(3, len(specs), height_ratios=(1.2, 0.9, 0.9))
        ax = fig.add_subplot(grid[0, :])
        width = 0.8 / len(HEADS)
        for j, head in enumerate(HEADS):
            part = groups[groups["head"] == head].pivot(index="group", columns="seed", values="loss").reindex(names)
            offset = x + (j - 1) * width                    # markers, not bars: the losses sit far from 0
            ax.plot(offset, part.mean(axis=1).to_numpy(dtype=float), "D", color=f"C{j}", markersize=7,
                    label=head_label(head, self.loss) + " (mean over seeds)")
            for seed in part.columns:                                  # every seed's value, a dot
                ax.plot(offset, part[seed].to_numpy(dtype=float), ".", color=f"C{j}", markersize=4, alpha=0.6)
        tested = groups.dropna(subset=["loss"])["group"]
        for position, name in zip(x, names):              # a group without test pairs in any seed: say so
            if name not in set(tested):
                ax.text(position, 0.5, "no test\npairs", transform=ax.get_xaxis_transform(), ha="center",
                        va="center", fontsize=7, color="0.4")
        for position in x[:-1]:
            ax.axvline(position + 0.5, color="0.9", linewidth=0.8)
        rotate = k > 6
        group_axis(ax, names, marks, rotate=rotate, fontsize=8)
        ax.set_ylabel("test loss")
        ax.set_title(f"test loss per group ({len(self.seeds)} seeds; dots: the seeds). The worst group can differ "
                     "from seed to seed: the paired panels below compare each seed's worst", fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.32 if rotate else -0.12),
                  framealpha=0.8)
        ax = fig.add_subplot(grid[1, :])
        alpha = self.alpha.reindex(columns=names)
        ax.bar(x, alpha.mean(axis=0).to_numpy(dtype=float), 0.6, color="C2")
        for _, row in alpha.iterrows():
            ax.plot(x, row.to_numpy(dtype=float), ".", color="k", markersize=3)
        ax.axhline(1.0 / max(k, 1), color="k", linewidth=0.8, linestyle=":", label="uniform 1/K")
        ax.set_ylim(0, 1.05)
        group_axis(ax, names, marks, rotate=rotate, fontsize=8)
        ax.set_title("GR's α* (train split; mean over seeds, dots: the seeds)", fontsize=10)
        ax.legend(fontsize=8)
        for m, metric in enumerate(specs):
            ax = fig.add_subplot(grid[2, m])
            part = self.paired[self.paired["metric"] == metric].reset_index(drop=True)
            y = np.arange(len(part))[::-1]
            d = part["difference"].to_numpy(dtype=float)
            err = np.vstack([d - part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float) - d])
            ax.errorbar(d, y, xerr=err, fmt="o", color="k", capsize=4)
            ax.axvline(0, color="0.5", linewidth=0.8)
            ax.set_yticks(y, [f"{_short(t, self.loss)} − {_short(b, self.loss)}"
                              for t, b in zip(part["treatment"], part["baseline"])], fontsize=8)
            better = "higher" if specs[metric][2] else "lower"
            ax.set_title(f"Δ {metric}\n({better} is better; {_level(self.level)} {self.interval})", fontsize=9)
        fig.suptitle(f"reference vs vanilla vs GR-{loss_label(self.loss)} on held-out test pairs", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _short(head, loss):
    return {"reference": "ref", "vanilla": "vanilla", "group_robust": f"GR-{loss_label(loss)}"}[head]


def _interval(row):
    from loglinear_grpo.inference import PairedInterval
    return PairedInterval(float(row["difference"]), float(row["low"]), float(row["high"]), int(row["n_seeds"]),
                          float(row["level"]), str(row["interval"]))


def _level(level):
    return f"{100 * level:g}%"


def _signed(x):
    return f"{x:+.4f}".replace("-", "\u2212")


def _join(values):
    return ", ".join(f"{v:g}" for v in values)


def _markdown(table):
    """A DataFrame as a Markdown table (no tabulate needed)."""
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return lines


def _seed_list(seeds):
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 2:
            raise ValueError(f"seeds: an interval over seeds needs at least 2 seeds, got {seeds}")
        return list(range(int(seeds)))
    out = sorted({int(s) for s in seeds})
    if len(out) < 2 or any(s < 0 for s in out):
        raise ValueError(f"seeds: give at least 2 distinct seeds >= 0, got {list(seeds)}")
    return out


def compare_methods(workdir, *, loss="dpo", seeds=3, radii=DEFAULT_RADII, adjustments=DEFAULT_ADJUSTMENTS,
                    criterion="worst-loss", beta=0.1, split_by=None, storage="auto", interval="t", level=0.95,
                    tol=1e-6, progress=True, **solve_kw):
    """The reference head, vanilla and group-robust heads (each with its own validation selection) on
    the test split of several seeds, and their paired differences.

    Parameters
    ----------
    workdir : str
        A work folder with extracted features (``python -m llm_head extract``).
    loss : str
        ``"dpo"``/``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
    seeds : int or sequence of int
        ``n``: seeds 0..n−1 (at least 2); each seed redraws the train/val/test split.
    radii, adjustments : sequence of float ≥ 0
        The grids of :func:`llm_head.select.select_head` (vanilla: R only).
    criterion : str
        The selection criterion (:data:`llm_head.select.CRITERIA`).
    beta : float
    split_by, storage : optional
        As :func:`llm_head.workdir.load_problem`.
    interval : {"t", "bootstrap"}
        The intervals over seeds (:func:`loglinear_grpo.inference.paired_interval`).
    level : float
    tol : float
        Every solve's relative certified gap.
    progress : bool
        Print the number of solves up front, then one line per seed and per solve.
    **solve_kw
        Other options of :func:`loglinear_grpo.solve`.

    Returns
    -------
    Comparison

    Raises
    ------
    ValueError
        Bad grids, criterion, seeds, interval or level (before anything is solved).
    """
    radii = check_grid("radii", radii)
    adjustments = check_grid("adjustments", adjustments)
    check_criterion(criterion)
    if interval not in ("t", "bootstrap"):
        raise ValueError(f"interval must be 't' or 'bootstrap', got {interval!r}")
    seeds = _seed_list(seeds)
    features = wd.paths(workdir)["features"]
    if not os.path.exists(features):                    # before the plan is printed
        raise FileNotFoundError(f"{features} not found: run `python -m llm_head extract` first")
    if 0.0 not in radii:
        radii = [0.0] + radii
    positive = sum(r > 0 for r in radii)
    per_seed = positive + positive * len(adjustments)
    if progress:
        print(f"compare ({loss_label(loss)}): {len(seeds)} seeds x ({positive} vanilla + {positive * len(adjustments)} "
              f"GR solves) = {len(seeds) * per_seed} certified solves; R = 0 (the reference) is exact", flush=True)
    rows, metric_rows, alphas, tables, notes = [], [], {}, {}, []
    small = {}
    group_names = None
    specs, groupings = dict(METRICS), ()
    tic = time.perf_counter()
    for i, seed in enumerate(seeds):
        problem, _ = wd.load_problem(workdir, seed=seed, split_by=split_by, storage=storage)
        if group_names is None:
            group_names, groupings = list(problem.group_names), tuple(problem.union)
            specs = metric_specs(groupings)
        if progress:
            sizes = {s: problem.data(s).n_samples for s in ("train", "val", "test")}
            print(f"seed {seed} ({i + 1}/{len(seeds)}): {sizes['train']} train, {sizes['val']} val, {sizes['test']} "
                  f"test pairs "
                  f"({time.perf_counter() - tic:.0f} s so far)", flush=True)
        heads = {}
        reference_val = CRITERIA[criterion].score(score_table(problem, problem.theta_ref, loss, beta, "val"))
        heads["reference"] = dict(theta=problem.theta_ref, radius=0.0, adjustment=0.0, val_score=reference_val,
                                  converged=True, gap=0.0)
        for method, grid_c in (("vanilla", [0.0]), ("group_robust", adjustments)):
            sel = select_head(problem, loss=loss, method=method, radii=radii, adjustments=grid_c, criterion=criterion,
                              beta=beta, tol=tol, progress=progress, seed=seed, **solve_kw)
            chosen = sel.scores[sel.scores["chosen"]].iloc[0]
            heads[method] = dict(theta=sel.theta, radius=sel.radius, adjustment=sel.adjustment,
                                 val_score=float(chosen["score"]), converged=bool(chosen["converged"]),
                                 gap=float(chosen["gap"]))
            notes += [f"seed {seed}, {head_label(method, loss)}: {n}" for n in sel.notes]
            if method == "group_robust":
                train_names = [str(g) for g in problem.data("train").group_names]
                alphas[seed] = pd.Series(np.asarray(sel.result.alpha, dtype=float), index=train_names)
        for head in HEADS:
            info = heads[head]
            table = score_table(problem, info["theta"], loss, beta, "test")
            tables[(seed, head)] = table
            meta = {"seed": seed, "head": head, "radius": info["radius"], "adjustment": info["adjustment"],
                    "val_score": info["val_score"], "converged": info["converged"], "gap": info["gap"]}
            flat = table.reset_index()
            named = {"worst": worst_group_name(table)} | {f"worst {g}": worst_group_name(table, g) for g in groupings}
            for record in flat.to_dict("records"):
                if record["kind"] == "aggregate" and record["group"] in named:   # a tie named as in report.md
                    record["worst_group"] = named[record["group"]]
                rows.append(meta | record)
            agg = table.loc["aggregate"]
            metric_rows.append(meta | {m: float(agg.loc[r, c]) for m, (r, c, _) in specs.items()}
                               | {"worst_group": named["worst"]}
                               | {f"worst_group/{g}": named[f"worst {g}"] for g in groupings})
        test_groups = tables[(seed, "group_robust")].loc["group"]
        for name, row in test_groups.iterrows():                # the seed with the fewest test pairs of a group
            n = 0 if pd.isna(row["n_pairs"]) else int(row["n_pairs"])
            if n < MIN_GROUP_PAIRS and (name not in small or n < small[name][0]):
                accuracy = float(row["rewards/accuracies"]) if n else float("nan")
                small[name] = (n, seed, small_group_note(n, accuracy if n else 0.0))
    heads_table = pd.DataFrame(rows)
    metrics = pd.DataFrame(metric_rows)
    paired = []
    higher = {m: h for m, (_, _, h) in specs.items()}
    for treatment, baseline in PAIRS:
        p = paired_comparison(metrics, metrics=list(specs), treatment=treatment, baseline=baseline,
                              method_column="head", seed_column="seed", higher_is_better=higher, level=level,
                              interval=interval)
        p.insert(0, "baseline", baseline)
        p.insert(0, "treatment", treatment)
        paired.append(p)
    paired = pd.concat(paired, ignore_index=True)
    alpha = pd.DataFrame(alphas).T.reindex(columns=group_names)
    alpha.index.name = "seed"
    small_notes = {g: f"{note} (the GR head's accuracy, in seed {seed}, where the group had the fewest test pairs; "
                      "every head is tested on the same pairs)" for g, (n, seed, note) in small.items()}
    if progress:
        print(f"compare: done in {time.perf_counter() - tic:.0f} s", flush=True)
    return Comparison(heads=heads_table, metrics=metrics, paired=paired, alpha=alpha, small_groups=small_notes,
                      notes=notes, tables=tables, loss=loss, criterion=criterion, interval=interval, level=level,
                      seeds=seeds, radii=radii, adjustments=adjustments, workdir=str(workdir),
                      group_names=group_names, metric_specs=specs, groupings=groupings)
