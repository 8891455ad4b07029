"""Overlapping groups at scale: the certified solvers on the union of two groupings against the same data
with one grouping's labels (issue 23's benchmark).

    python benchmarks/overlapping.py [--pairs 1000000] [--dim 64] [--losses dpo ipo]

A dense in-memory S (N × d float64, random), two groupings of 5 and 4 groups of unequal sizes; the union
(9 overlapping groups, every pair in two) against the 5 labels of the first grouping alone. Each solve is
certified to 10⁻⁶ on a ball of radius 1; one process, the solves one after the other. Prints and saves
``paper_figures/performance/overlapping.csv`` and ``.md``. The full-batch estimator and Algorithm 1 run a
fixed number of iterations (their time per iteration is what compares).
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


#: full-batch iterations timed (each one pass over S)
FULL_STEPS = 50


def _problem(n, d, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((n, d)) / np.sqrt(d)
    r = 0.3 * rng.standard_normal(n)
    first = rng.choice(5, n, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    second = rng.choice(4, n, p=[0.45, 0.3, 0.15, 0.1])
    return s, r, first, second


def _run(data, estimator, loss, steps=None):
    t = time.perf_counter()
    kw = dict(loss=loss, beta=0.1, radius=1.0, estimator=estimator)
    if estimator == "stochastic":
        kw.update(steps=steps, batch_size=64, seed=0, tol=None, step_size=0.05, alpha_step_size=0.05)
    if estimator == "full":                        # time per iteration: a fixed number, not certified
        kw.update(steps=FULL_STEPS, tol=None)
    res = lg.solve(data, **kw)
    return res, time.perf_counter() - t


def _ops(s, labels, union, path, args, block=65536, repeats=31):
    """The memberships' operations, labels against the union: the median of ``repeats`` timings, in ms
    (printed, and written to ``path``)."""
    rng = np.random.default_rng(0)
    values = rng.random(s.shape[0])
    rows = []
    for name, data in (("labels", labels), ("union", union)):
        m = data.membership
        group_values = rng.random(m.n_groups)
        ops = {"sums (N)": lambda: m.sums(values), "spread (N)": lambda: m.spread(group_values),
               f"indicator @ S block ({block})": lambda: m.indicator(values[:block], 0, block) @ s[:block]}
        for op, f in ops.items():
            f()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            rows.append({"membership": name, "operation": op, "ms": 1e3 * float(np.median(times))})
    table = pd.DataFrame(rows).pivot(index="operation", columns="membership", values="ms")
    table["union / labels"] = table["union"] / table["labels"]
    print(table.round(2).to_string())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/overlapping.py --ops "
                 f"--pairs {args.pairs} --dim {args.dim}`: median of {repeats}, ms\n\n")
        fh.write("| operation | labels | union | union / labels |\n|---|---|---|---|\n")
        for op, row in table.iterrows():
            fh.write(f"| {op} | {row['labels']:.2f} | {row['union']:.2f} | {row['union / labels']:.2f} |\n")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--losses", nargs="+", default=["dpo", "ipo"])
    p.add_argument("--stochastic-steps", type=int, default=2000)
    p.add_argument("--estimators", nargs="+", default=["newton", "newton_cg", "full", "stochastic"])
    p.add_argument("--name", default="overlapping", help="output file stem")
    p.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "performance"))
    p.add_argument("--ops", action="store_true",
                   help="instead: time the memberships' own operations (group sums, spreads, the group indicator "
                        "and its product with a block of S), labels against the union, in ms")
    args = p.parse_args(argv)
    s, r, first, second = _problem(args.pairs, args.dim)
    t = time.perf_counter()
    labels = lg.PreferenceData(s, first, r, check_finite=False)
    setup_labels = time.perf_counter() - t
    t = time.perf_counter()
    union = lg.PreferenceData(s, {"a": first, "b": second}, r, check_finite=False)
    setup_union = time.perf_counter() - t
    print(f"N={args.pairs:,} d={args.dim}: labels K={labels.n_groups} (setup {setup_labels:.2f} s), union "
          f"K={union.n_groups} (setup {setup_union:.2f} s)", flush=True)
    if args.ops:
        return _ops(s, labels, union, os.path.join(args.out, f"{args.name}_ops.md"), args)
    rows = []
    for loss in args.losses:
        for estimator in args.estimators:
            row = {"loss": loss, "estimator": estimator}
            for name, data in (("labels", labels), ("union", union)):
                res, sec = _run(data, estimator, loss, args.stochastic_steps)
                row.update({f"{name}_s": sec, f"{name}_converged": bool(res.converged),
                            f"{name}_relative_gap": float(res.relative_gap), f"{name}_passes": res.passes,
                            f"{name}_iterations": res.n_iter})
            row["ratio"] = row["union_s"] / row["labels_s"]
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, f"{args.name}.csv"), index=False)
    cols = ["loss", "estimator", "labels_s", "union_s", "ratio", "labels_converged", "union_converged",
            "labels_relative_gap", "union_relative_gap", "labels_passes", "union_passes"]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(f"`python benchmarks/overlapping.py --pairs {args.pairs} --dim {args.dim}`\n\n")
        fh.write(f"N = {args.pairs:,}, d = {args.dim}, dense float64 S; labels: one grouping of 5 groups; union: "
                 "that grouping and one of 4 (9 groups, every pair in two); ball R = 1, β = 0.1, certified to "
                 f"10⁻⁶ (stochastic: {args.stochastic_steps} steps of batch 64; full: {FULL_STEPS} iterations; "
                 "neither certified)\n\n")
        fh.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for _, row in table[cols].iterrows():
            fh.write("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |\n")
    print(table[cols].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
