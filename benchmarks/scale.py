"""Certified heads at real data scale: the matrix-free solver against the row-space one (issue 21).

    python benchmarks/scale.py [--pairs 10000 30000 100000] [--losses dpo ipo] [--row-space-at 10000]
        [--length 8] [--hidden-size 2048] [--vocab 8000] [--radius 1.0] [--cache-dir DIR] [--quick]
        [--out paper_figures/performance] [--dense N --dense-dim 64] [--combine A.csv B.csv ...]

The cache is random float16 hidden states (no model needed; ``benchmarks/implicit_features.py``'s
layout), memory-mapped: ``pairs`` pairs of two answers of L tokens, one hidden state of size d_h per
answer token, tokens uniform over |V′| ids, so θ ∈ R^{|V′|·d_h} (16.4 M at the defaults), K = 6
unequal groups (35/25/15/12/8/5 %), reference margins N(0, 1). S is the implicit
``llm_head.features.PairDifferenceOperator``. Each solve runs in a fresh process (its peak RSS is its
own; the mapped cache pages count in it): ``lg.solve`` with the matrix-free ``estimator="newton_cg"``,
GR-DPO and GR-IPO on the ball of radius ``--radius`` around 0, and at ``--row-space-at`` pairs the
row-space ``newton`` in the same run; ``auto_picks`` says which of the two the default
``estimator="auto"`` would run there (by predicted memory). ``--dense N``: the same solvers on a dense in-memory S of N × ``--dense-dim`` (random normal).

Prints a table and writes ``scale.csv``, ``scale.md`` and ``scale.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from implicit_features import peak_rss_bytes  # noqa: E402  (the same VmHWM reading)

SHARES = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def groups_for(n, seed=0):
    rng = np.random.default_rng(seed)
    groups = rng.choice(SHARES.size, n, p=SHARES)
    groups[:SHARES.size] = np.arange(SHARES.size)
    return groups


def cache_folder(args, pairs):
    return os.path.join(args.cache_dir, f"n{pairs}_L{args.length}_h{args.hidden_size}_v{args.vocab}")


def ensure_cache(args, pairs):
    from implicit_features import make_cache
    folder = cache_folder(args, pairs)
    if not os.path.exists(os.path.join(folder, "tokens.npy")):
        os.makedirs(folder, exist_ok=True)
        t = time.perf_counter()
        make_cache(folder, pairs, args.length, args.hidden_size, args.vocab, seed=pairs)
        print(f"  cache for {pairs} pairs written in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def load_data(args, pairs):
    import loglinear_grpo as lg
    if args.source == "dense":
        rng = np.random.default_rng(pairs)
        diff = rng.standard_normal((pairs, args.dense_dim))
        return lg.PreferenceData(diff, groups_for(pairs), rng.standard_normal(pairs)), diff.nbytes
    from implicit_features import load_features
    from llm_head.features import PairDifferenceOperator
    features, chosen, rejected = load_features(cache_folder(args, pairs), pairs, args.length, args.hidden_size)
    op = PairDifferenceOperator(features, chosen, rejected)
    ref = np.random.default_rng(pairs + 1).standard_normal(pairs)
    return lg.PreferenceData(op, groups_for(pairs), ref), 2 * 2 * pairs * args.length * args.hidden_size


def measure(args):
    """One solve in this process; prints one JSON line."""
    import loglinear_grpo as lg
    t0 = time.perf_counter()
    data, cache_bytes = load_data(args, args.pairs[0])
    setup = time.perf_counter() - t0
    row = {"source": args.source, "pairs": data.n_samples, "dim": data.dim, "groups": data.n_groups,
           "loss": args.losses[0], "asked": args.estimator, "cache_GiB": cache_bytes / 2**30, "setup_s": setup}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        res = lg.solve(data, loss=args.losses[0], beta=args.beta, radius=args.radius, estimator=args.estimator,
                       progress=False)
        row["solve_s"] = time.perf_counter() - t
    from loglinear_grpo.newton_cg import choose_solver
    row["auto_picks"] = choose_solver(data, args.losses[0], res.config.theta_set)[0]
    row.update(solver=res.solver, converged=bool(res.converged), relative_gap=float(res.relative_gap),
               value=float(res.value), iterations=int(res.n_iter), passes=int(res.passes),
               cg_iterations=None if res.cg_iterations is None else int(res.cg_iterations),
               bound_kind=res.bound_kind, peak_rss_GiB=peak_rss_bytes() / 2**30,
               predicted_dense_GiB=res.memory["dense_bytes"] / 2**30,
               predicted_matrix_free_GiB=res.memory["matrix_free_bytes"] / 2**30)
    row["rss_over_cache_GiB"] = row["peak_rss_GiB"] - row["cache_GiB"]
    print(json.dumps(row), flush=True)


def run_child(args, pairs, loss, estimator):
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", "--pairs", str(pairs), "--losses", loss,
           "--estimator", estimator, "--length", str(args.length), "--hidden-size", str(args.hidden_size),
           "--vocab", str(args.vocab), "--radius", str(args.radius), "--beta", str(args.beta),
           "--cache-dir", args.cache_dir, "--source", args.source, "--dense-dim", str(args.dense_dim)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"pairs": pairs, "loss": loss, "asked": estimator, "error": out.stderr.strip().splitlines()[-1][-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(table, columns):
    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else (f"{v:.2e}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}")
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in table.iterrows()]
    return "\n".join(lines)


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (loss, solver), part in table.groupby(["loss", "solver"]):
        part = part.sort_values("pairs")
        style = "o-" if solver == "newton_cg" else "s--"
        axes[0].plot(part["pairs"], part["solve_s"], style, label=f"GR-{loss.upper()}, {solver}")
        axes[1].plot(part["pairs"], part["peak_rss_GiB"], style, label=f"GR-{loss.upper()}, {solver}")
    caches = table.drop_duplicates("pairs").sort_values("pairs")
    axes[1].plot(caches["pairs"], caches["cache_GiB"], "k:", label="cache (memory-mapped)")
    axes[1].plot(caches["pairs"], caches["cache_GiB"] + 2, "r:", label="cache + 2 GiB (goal)")
    axes[0].set(xscale="log", yscale="log", xlabel="pairs N", ylabel="s per certified solve",
                title="time to a certified 1e-6 gap")
    axes[1].set(xscale="log", yscale="log", xlabel="pairs N", ylabel="GiB", title="peak resident memory")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    first = table.iloc[0]
    fig.suptitle(f"implicit S, d = {int(first['dim']):,}, K = {int(first['groups'])}; 2-core CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    p.add_argument("--losses", nargs="+", default=["dpo", "ipo"])
    p.add_argument("--row-space-at", type=int, nargs="*", default=[10_000],
                   help="also run the row-space/dense solver (estimator='newton') at these N")
    p.add_argument("--length", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--radius", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--estimator", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--source", choices=("implicit", "dense"), default="implicit", help=argparse.SUPPRESS)
    p.add_argument("--dense", type=int, nargs="*", default=[],
                   help="instead: a dense in-memory S with these N (d = --dense-dim)")
    p.add_argument("--dense-dim", type=int, default=64)
    p.add_argument("--cache-dir", default="/tmp/lg_scale_cache", help="where the random caches are written")
    p.add_argument("--quick", action="store_true", help="N = 1000 2000, d_h = 256, |V'| = 1000 (a smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "performance"))
    p.add_argument("--name", default="scale", help="output file stem")
    p.add_argument("--combine", nargs="+", metavar="CSV",
                   help="only draw scale.png (and scale_all.csv) from these tables of earlier runs")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    if args.combine:
        table = pd.concat([pd.read_csv(path) for path in args.combine], ignore_index=True)
        if "error" in table:
            table = table[table["error"].isna()]
        implicit = table[table["source"] == "implicit"]
        implicit.to_csv(os.path.join(args.out, f"{args.name}_all.csv"), index=False)
        plot(implicit, os.path.join(args.out, f"{args.name}.png"))
        return 0
    if args.quick:
        args.pairs, args.hidden_size, args.vocab, args.row_space_at = [1000, 2000], 256, 1000, [1000]
    if args.dense:
        args.source, args.pairs, args.row_space_at = "dense", args.dense, args.dense
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for pairs in args.pairs:
        if args.source == "implicit":
            ensure_cache(args, pairs)
        for loss in args.losses:
            for estimator in ["newton_cg"] + (["newton"] if pairs in args.row_space_at else []):
                row = run_child(args, pairs, loss, estimator)
                print("  " + json.dumps(row), flush=True)
                rows.append(row)
                pd.DataFrame(rows).to_csv(os.path.join(args.out, f"{args.name}.csv"), index=False)
    table = pd.DataFrame(rows)
    ok = table[~table.get("error", pd.Series(index=table.index, dtype=object)).notna()] if "error" in table else table
    columns = ["pairs", "loss", "solver", "auto_picks", "converged", "relative_gap", "solve_s", "iterations", "passes",
               "cg_iterations", "peak_rss_GiB", "cache_GiB", "rss_over_cache_GiB", "predicted_dense_GiB"]
    text = markdown(ok, [c for c in columns if c in ok])
    if "error" in table and table["error"].notna().any():
        text += "\n\nFailed:\n" + "\n".join(f"- N={r.pairs} {r.loss} {r.asked}: {r.error}"
                                            for r in table[table["error"].notna()].itertuples())
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(f"`python benchmarks/scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}\n")
    print(text)
    if len(ok) and args.source == "implicit":              # (the figure is of the implicit S)
        plot(ok, os.path.join(args.out, f"{args.name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
