"""Overlapping groups on real data: GlobalOpinionQA's TRL-format pairs grouped by country *and* by survey.

    python paper_figures/overlapping_groups.py [--workdir /tmp/lg_overlap_work] [--seeds 5] [--radius 1]
                                               [--second source|region]

The shared survey pairs (``../shared/data/global_opinions_pairs.jsonl``: 2 969 pairs, 12 countries) with
SmolLM2-135M's last-layer features (extracted once into ``--workdir``: 31 minutes on two shared CPU cores),
and a second grouping beside the country: by default the survey the question comes from (Pew's Global
Attitudes, ``GAS``, or the World Values Survey, ``WVS``: the ``source`` column of
``global_opinions_partial.csv``, row ``question_id``), which crosses the countries. (``--second region``
groups the countries into four regions instead: a coarsening of the country grouping, whose groups can never
be the worst — a region's loss is a weighted mean of its countries' — so the union's optimum is the
countries' own.) For
every seed (a redrawn train/val/test split, split by question) three heads are trained on the train split,
each certified (relative gap ≤ 10⁻⁶; GR-DPO, β = 0.1, ball of radius ``--radius`` around the frozen model):

* vanilla DPO (the pairs' mean loss);
* GR over countries (the 12 country groups, labels);
* GR over the union (the 12 countries and the second grouping's groups, overlapping, each pair in two).

On the held-out test pairs each head's worst country loss and worst second-grouping loss are compared, paired over
the seeds (t intervals of the mean difference), and the union's α* (the certificate's group weights) says
which groups bind. Writes ``paper_figures/overlapping/summary.md``, ``results.csv`` and ``overlapping.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import loglinear_grpo as lg  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data", "global_opinions_pairs.jsonl")
REGION = {"United States": "Americas", "Brazil": "Americas", "Mexico": "Americas",
          "Germany": "Europe", "France": "Europe", "Russia": "Europe",
          "Nigeria": "Africa & Middle East", "Egypt": "Africa & Middle East",
          "Pakistan": "Asia", "Japan": "Asia", "China": "Asia", "India (Current national sample)": "Asia"}
CSV = os.path.join(ROOT, "..", "shared", "data", "global_opinions_partial.csv")
HEADS = ("vanilla DPO", "GR over countries", "GR over the union")


def _second_grouping(problem, record, seed, split, second):
    """The second grouping's label of every pair of ``split`` (rows in the problem's order)."""
    from llm_head.workdir import pairs_for_seed
    table = problem.split_pairs(split)
    if second == "region":
        return np.asarray([REGION[problem.group_names[g]] for g in table["group"].to_numpy()], dtype=object)
    questions = pairs_for_seed(record, seed, None).table["question_id"].to_numpy()   # aligned with problem.pairs
    source = pd.read_csv(CSV)["source"].to_numpy()
    return np.asarray(source[questions[table.index.to_numpy()]], dtype=object)


def _union(problem, record, seed, split, second):
    data = problem.data(split)
    table = problem.split_pairs(split)
    country = np.asarray([problem.group_names[g] for g in table["group"].to_numpy()], dtype=object)
    return lg.PreferenceData(data.diff, {"country": country, second: _second_grouping(problem, record, seed, split,
                                                                                       second)},
                             data.ref_margin, check_finite=False, check_adjoint=False)


def run_seed(workdir, seed, radius, beta, second):
    from llm_head.workdir import load_problem
    problem, record = load_problem(workdir, seed=seed)
    train = problem.data("train")
    union_train = _union(problem, record, seed, "train", second)
    union_test = _union(problem, record, seed, "test", second)
    kw = dict(loss="dpo", beta=beta, radius=radius, center=problem.theta_ref, tol=1e-6)
    heads, rows = {}, []
    t = time.perf_counter()
    heads["vanilla DPO"] = lg.solve(train, method="vanilla", **kw)
    heads["GR over countries"] = lg.solve(train, method="group_robust", **kw)
    heads["GR over the union"] = lg.solve(union_train, method="group_robust", **kw)
    seconds = time.perf_counter() - t
    names = union_test.group_names
    for head, res in heads.items():
        if not res.converged:
            raise RuntimeError(f"seed {seed}: {head} did not certify: {res.summary()}")
        test = lg.group_losses(res.theta, union_test, "dpo", beta)
        train_losses = lg.group_losses(res.theta, union_train, "dpo", beta)
        for grouping in ("country", second):
            idx = [i for i, n in enumerate(names) if n.startswith(grouping + "=")]
            worst = idx[int(np.argmax(test[idx]))]
            rows.append({"seed": seed, "head": head, "grouping": grouping, "worst_test_loss": float(test[worst]),
                         "worst_test_group": names[worst].split("=", 1)[1],
                         "worst_train_loss": float(np.max(train_losses[idx])),
                         "relative_gap": float(res.relative_gap), "solver": res.solver})
    alpha = pd.Series(heads["GR over the union"].alpha, index=union_train.group_names, name=seed)
    return rows, alpha, seconds


def paired(table, treatment, control, grouping):
    from scipy import stats
    pivot = table[table["grouping"] == grouping].pivot(index="seed", columns="head", values="worst_test_loss")
    diff = (pivot[treatment] - pivot[control]).to_numpy()
    n = diff.size
    mean = float(diff.mean())
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    return mean, mean - half, mean + half, int(np.sum(diff < 0)), n


def plot(table, alphas, path, second):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    width = 0.26
    for j, head in enumerate(HEADS):
        means, halves = [], []
        for grouping in ("country", second):
            v = table[(table["head"] == head) & (table["grouping"] == grouping)]["worst_test_loss"].to_numpy()
            means.append(v.mean())
            halves.append(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0)
        axes[0].bar(np.arange(2) + (j - 1) * width, means, width, yerr=halves, capsize=3, label=head)
    axes[0].set(xticks=[0, 1], xticklabels=["worst country", f"worst {second}"], ylabel="held-out DPO loss",
                title=f"held-out worst-group loss ({table['seed'].nunique()} seeds, 95% t intervals)")
    lo = table["worst_test_loss"].min()
    axes[0].set_ylim(max(0.0, lo - 0.05), None)
    axes[0].legend(fontsize=8)
    mean_alpha = alphas.mean(axis=1).sort_values(ascending=False)
    colors = ["tab:blue" if n.startswith("country=") else "tab:orange" for n in mean_alpha.index]
    axes[1].bar(range(len(mean_alpha)), mean_alpha.to_numpy(), color=colors)
    axes[1].set_xticks(range(len(mean_alpha)))
    axes[1].set_xticklabels([n.split("=", 1)[1][:14] for n in mean_alpha.index], rotation=60, ha="right", fontsize=8)
    axes[1].set(ylabel="α* (mean over seeds)", title=f"the union's certified group weights (blue: country, orange: {second})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/lg_overlap_work")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--radius", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--second", default="source", choices=("source", "region"),
                   help="the second grouping: the survey (crosses the countries) or the region (nests them)")
    p.add_argument("--out", default=os.path.join(HERE, "overlapping"))
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "dataset.json")):
        from llm_head import extract_to_workdir
        t = time.perf_counter()
        extract_to_workdir(DATA, args.workdir, model="smollm2", split_by="question_id", device="cpu")
        print(f"features extracted in {time.perf_counter() - t:.0f} s", flush=True)
    rows, alphas, seconds = [], [], 0.0
    for seed in range(args.seeds):
        r, a, s = run_seed(args.workdir, seed, args.radius, args.beta, args.second)
        rows += r
        alphas.append(a)
        seconds += s
        print(f"seed {seed}: " + "; ".join(f"{x['head']} worst {x['grouping']} {x['worst_test_loss']:.4f}"
                                           for x in r), flush=True)
    table = pd.DataFrame(rows)
    alphas = pd.concat(alphas, axis=1)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "results.csv"), index=False)
    alphas.to_csv(os.path.join(args.out, "alpha.csv"))
    plot(table, alphas, os.path.join(args.out, "overlapping.png"), args.second)
    lines = [f"# Overlapping groups on GlobalOpinionQA pairs: country and {args.second} at once\n",
             f"`python paper_figures/overlapping_groups.py --seeds {args.seeds} --radius {args.radius} "
             f"--second {args.second}` "
             f"(SmolLM2-135M features; GR-DPO, β = {args.beta}, ball R = {args.radius} around the frozen model; "
             f"every head certified to 10⁻⁶; {seconds / 60:.1f} min of solving)\n",
             "Held-out test pairs, mean over seeds of the worst group's loss [95% t interval]:\n",
             f"| head | worst country | worst {args.second} |", "|---|---|---|"]
    from scipy import stats
    for head in HEADS:
        cells = []
        for grouping in ("country", args.second):
            v = table[(table["head"] == head) & (table["grouping"] == grouping)]["worst_test_loss"].to_numpy()
            half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else np.nan
            cells.append(f"{v.mean():.4f} [{v.mean() - half:.4f}, {v.mean() + half:.4f}]")
        lines.append(f"| {head} | {cells[0]} | {cells[1]} |")
    lines.append("\nPaired differences on the test split (treatment − control; negative = better):\n")
    for treatment, control in ((HEADS[2], HEADS[1]), (HEADS[2], HEADS[0]), (HEADS[1], HEADS[0])):
        for grouping in ("country", args.second):
            mean, lo, hi, better, n = paired(table, treatment, control, grouping)
            verdict = "significant" if hi < 0 or lo > 0 else "no significant difference"
            lines.append(f"* {treatment} vs {control}, worst {grouping}: {mean:+.4f} (95% CI {lo:+.4f} to "
                         f"{hi:+.4f}; {verdict}; better in {better} of {n} seeds)")
    mean_alpha = alphas.mean(axis=1).sort_values(ascending=False)
    lines.append("\nThe union's α* (mean over seeds; the groups that bind on the train split): " +
                 ", ".join(f"{name} {value:.3f}" for name, value in mean_alpha.items() if value > 1e-3))
    lines.append("\n![overlapping](overlapping.png)\n")
    text = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
