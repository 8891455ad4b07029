"""The certified regularisation path (``lg.solve_path``) against a cold-started grid of the same points.

    python benchmarks/path.py --workdir results/pairs                  # the TRL-pairs head (after extract)
    python benchmarks/path.py --synthetic                               # no features needed: a random head

Three runs solve every point (R, C) of the same grid with the default certified solver (``tol=1e-6``), in
one process: the cold grid (every point from θ_ref at the default temperature), the path (each point from
its neighbour's θ, ``warm_start=True``) and the path that also starts colder (``warm_start="temperature"``).
Rows: total time, passes over S and Newton iterations of each, their ratios to the cold grid, and the
largest difference of the certified values (which must lie within the gaps). Writes ``path.csv`` (per
point) and ``path.md`` to ``--out``.

The TRL-pairs head: ``python -m llm_head extract --data ../shared/data/global_opinions_pairs.jsonl
--model smollm2 --workdir results/pairs --split-by question_id`` (about 11 minutes on 2 CPU cores),
split of seed 0, its training pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import loglinear_grpo as lg  # noqa: E402


def markdown(frame, digits=4):
    """A DataFrame as a GitHub table (no optional dependency)."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}g}"
        return str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def head_problem(workdir, split_by):
    import llm_head as lh
    problem, _ = lh.load_problem(workdir, seed=0, split_by=split_by)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = problem.data("train")
    return data, problem.theta_ref, f"TRL-pairs head ({workdir}): N={data.n_samples}, d={data.dim}, K={data.n_groups}"


def synthetic_problem(n=1500, d=4000, k=12, seed=0):
    """A random wide head (d > N, the row-space path) with K unequal groups that disagree."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(40, 250, size=k)
    sizes = np.maximum((sizes / sizes.sum() * n).astype(int), 5)
    taste = rng.normal(size=(k, d))
    rows, groups = [], []
    for g, m in enumerate(sizes):
        s = rng.normal(size=(m, d)) / np.sqrt(d)
        keep = rng.random(m) < 1.0 / (1.0 + np.exp(-3.0 * s @ taste[g]))
        s[~keep] *= -1.0
        rows.append(s)
        groups.append(np.full(m, g))
    data = lg.PreferenceData(np.vstack(rows), np.concatenate(groups))
    return data, np.zeros(d), f"random head: N={data.n_samples}, d={d}, K={k}"


def run(data, center, radii, adjustments, loss):
    out = {}
    modes = {"cold": False, "path": True, "path, colder start": "temperature"}    # warm_start of each run
    for mode, warm in modes.items():
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = lg.solve_path(data, radii, adjustments, center=center, loss=loss, warm_start=warm, progress=True)
        out[mode] = (time.perf_counter() - tic, res.table)
        print(f"{mode}: {out[mode][0]:.1f} s", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="results/pairs")
    p.add_argument("--split-by", default="question_id")
    p.add_argument("--synthetic", action="store_true", help="a random wide head instead of the TRL-pairs features")
    p.add_argument("--loss", default="dpo", choices=("dpo", "ipo"))
    p.add_argument("--radii", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--adjustments", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "performance"))
    args = p.parse_args(argv)
    data, center, what = synthetic_problem() if args.synthetic else head_problem(args.workdir, args.split_by)
    print(what, flush=True)
    # warm the row-space cache (one N × N eigen-decomposition per data set, shared by both runs)
    lg.solve(data, loss=args.loss, radius=args.radii[0], center=center, steps=1, tol=1e-1)
    out = run(data, center, args.radii, args.adjustments, args.loss)
    cold_seconds, cold = out["cold"]
    rows, per_point = [], [cold[["radius", "adjustment", "value", "gap", "seconds", "iterations"]].rename(
        columns=lambda c: c if c in ("radius", "adjustment") else f"{c} (cold)")]
    for mode, (seconds, table) in out.items():
        merged = cold.merge(table, on=["radius", "adjustment"], suffixes=("_cold", ""))
        difference = (merged["value"] - merged["value_cold"]).abs()
        rows.append({"run": mode, "seconds": seconds, "passes": int(table["passes"].sum()),
                     "iterations": int(table["iterations"].sum()), "all converged": bool(table["converged"].all()),
                     "time ratio (cold / this)": cold_seconds / seconds,
                     "iteration ratio": cold["iterations"].sum() / max(table["iterations"].sum(), 1),
                     "max |value − cold|": float(difference.max()),
                     "within the gaps": bool((difference <= merged["gap_cold"] + merged["gap"] + 1e-12).all())})
        if mode != "cold":
            per_point.append(table[["seconds", "iterations", "warm"]].rename(columns=lambda c: f"{c} ({mode})"))
    summary = pd.DataFrame(rows)
    points = pd.concat(per_point, axis=1)
    os.makedirs(args.out, exist_ok=True)
    stem = "path_synthetic" if args.synthetic else "path"
    points.to_csv(os.path.join(args.out, f"{stem}.csv"), index=False)
    lines = [f"# Certified path vs cold grid: {what}", "",
             f"`python benchmarks/path.py {' '.join(argv if argv is not None else sys.argv[1:])}`; {args.loss.upper()}, "
             f"group robust, radii {args.radii}, adjustments {args.adjustments}, tol 1e-6, in one process.", "",
             markdown(summary), "", markdown(points, 7)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
