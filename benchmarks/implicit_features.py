"""Long answers at LLM scale: the implicit S against the CSR S (issue 14).

    python benchmarks/implicit_features.py [--pairs 10000] [--lengths 4 8 16 32 64] [--hidden-size 2048]
        [--vocab 8000] [--solve-pairs 2000] [--quick] [--out paper_figures/performance] [--redraw]

Random hidden states (no model needed) stand in for a cache of final hidden states: ``pairs`` pairs of
two answers of ``L`` tokens each, one float16 hidden state of size ``hidden-size`` per answer token
(memory-mapped from a temporary file), tokens uniform over ``vocab`` ids, K = 5 groups. For each answer
length L, in a fresh process each (so that its peak memory is its own):

* implicit S (``llm_head.features.PairDifferenceOperator``): set-up time (with the row norms), time
  of one full-batch GR-DPO iteration (``kernels.full_pass`` + the θ gradient: two reads of the
  cache), peak resident memory (VmHWM, mapped cache pages included) and peak allocations (tracemalloc);
* CSR S where it fits in ``--csr-limit`` GiB (else its predicted size): build time, iteration time, memory;
* a certified GR-DPO solve (default ``solve``, Θ = ball of radius 1) on the implicit S, with
  ``--solve-pairs`` pairs and the longest L.

Prints a table, writes ``implicit_features.csv`` and ``implicit_features.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

GROUPS = 5


def make_cache(folder, pairs, length, hidden_size, vocab, seed=0):
    """hidden.f16 with row ``t·2N + c`` = the state scoring token t of answer c (so the first L tokens of
    every answer are a prefix of the file), and tokens.npy (2N × length)."""
    rng = np.random.default_rng(seed)
    answers = 2 * pairs
    path = os.path.join(folder, "hidden.f16")
    hidden = np.memmap(path, dtype=np.float16, mode="w+", shape=(length * answers, hidden_size))
    step = max(1, (64 << 20) // (4 * hidden_size))
    for start in range(0, hidden.shape[0], step):
        stop = min(start + step, hidden.shape[0])
        hidden[start:stop] = rng.standard_normal((stop - start, hidden_size), dtype=np.float32)
    hidden.flush()
    del hidden
    np.save(os.path.join(folder, "tokens.npy"), rng.integers(0, vocab, (answers, length)).astype(np.int32))


def load_features(folder, pairs, length, hidden_size):
    from llm_head.features import LastLayerFeatures
    tokens = np.load(os.path.join(folder, "tokens.npy"))
    answers = 2 * pairs
    full_length = tokens.shape[1]
    cache = np.memmap(os.path.join(folder, "hidden.f16"), dtype=np.float16, mode="r",
                      shape=(full_length * answers, hidden_size))[:length * answers]
    cand = np.repeat(np.arange(answers), length)
    pos = np.tile(np.arange(length), answers)
    features = LastLayerFeatures(cache, cand, tokens[cand, pos].astype(np.int64), pos * answers + cand,
                                 np.arange(answers + 1))
    return features, np.arange(0, answers, 2), np.arange(1, answers, 2)


def peak_rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return float("nan")


def measure(args):
    """One (route, L) measurement in this process; prints one JSON line."""
    import loglinear_grpo as lg
    from llm_head.features import PairDifferenceOperator
    from loglinear_grpo.kernels import full_pass

    pairs = args.solve_pairs if args.route == "solve" else args.pairs
    features, chosen, rejected = load_features(args.cache, args.pairs, args.length, args.hidden_size)
    chosen, rejected = chosen[:pairs], rejected[:pairs]
    groups = np.arange(pairs) % GROUPS
    cache_bytes = 2 * 2 * pairs * args.length * args.hidden_size
    row = {"route": args.route, "pairs": pairs, "length": args.length, "hidden_size": args.hidden_size,
           "vocab": int(features.vocab.size), "dim": int(features.dim), "cache_GiB": cache_bytes / 2**30}
    tracemalloc.start()
    t0 = time.perf_counter()
    if args.route == "csr":
        diff = features.pair_differences(chosen, rejected)
        row["csr_GiB"] = (diff.data.nbytes + diff.indices.nbytes + diff.indptr.nbytes) / 2**30
    else:
        diff = PairDifferenceOperator(features, chosen, rejected)
        row["csr_GiB_predicted"] = diff.explicit_nbytes() / 2**30
    data = lg.PreferenceData(diff, groups)                    # checks finiteness: one pass (row norms)
    row["setup_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(features.dim) * 1e-2
    weights = np.full(GROUPS, 1.0 / GROUPS) / data.group_sizes
    if args.route == "solve":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            result = lg.solve(data, loss="dpo", beta=0.1, radius=1.0, progress=False)
            row["solve_s"] = time.perf_counter() - t
        row.update(converged=bool(result.converged), gap=float(result.gap), relative_gap=float(result.relative_gap),
                   value=float(result.value), n_iter=int(result.n_iter), passes=int(result.passes),
                   estimator=result.config.estimator)
    else:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            full_pass(theta, data, "dpo", 0.1).gradient(weights, data)
            times.append(time.perf_counter() - t)
        row["iteration_s"] = min(times)
    row["peak_traced_GiB"] = tracemalloc.get_traced_memory()[1] / 2**30
    row["peak_rss_GiB"] = peak_rss_bytes() / 2**30
    print(json.dumps(row), flush=True)


def run_child(args, route, length, cache):
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", route, "--length", str(length), "--cache", cache,
           "--pairs", str(args.pairs), "--hidden-size", str(args.hidden_size), "--solve-pairs", str(args.solve_pairs),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{route} L={length} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for route, style in (("implicit", "o-"), ("csr", "s--")):
        part = table[table["route"] == route].sort_values("length")
        if part.empty:
            continue
        axes[0].plot(part["length"], part["iteration_s"], style, label=route)
        axes[1].plot(part["length"], part["peak_rss_GiB"], style, label=f"{route}: peak RSS")
    part = table[table["route"] == "implicit"].sort_values("length")
    axes[1].plot(part["length"], part["cache_GiB"], "k:", label="hidden-state cache")
    axes[1].plot(part["length"], part["csr_GiB_predicted"], "r:", label="CSR S (predicted)")
    axes[0].set(yscale="log", ylabel="s per full-batch GR-DPO iteration", title="time per iteration")
    axes[1].set(yscale="log", ylabel="GiB", title="peak resident memory (mapped cache included)")
    for ax, column in ((axes[0], ["iteration_s"]), (axes[1], ["peak_rss_GiB", "cache_GiB", "csr_GiB_predicted"])):
        values = table[column].to_numpy(dtype=float)
        low, high = np.nanmin(values), np.nanmax(values)
        ticks = 2.0 ** np.arange(np.floor(np.log2(low)), np.ceil(np.log2(high)) + 1)
        ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    lengths = sorted(table["length"].unique())
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(v) for v in lengths])
        ax.minorticks_off()
        ax.set_xlabel("answer length L (tokens)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{int(part['pairs'].iloc[0])} pairs, d_h = {int(part['hidden_size'].iloc[0])}, "
                 f"|V'| = {int(part['vocab'].max())}, K = {GROUPS}, float16 cache", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--solve-pairs", type=int, default=2000, help="pairs of the certified solve (longest L)")
    p.add_argument("--csr-limit", type=float, default=6.0, help="build the CSR S up to this many GiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1000 pairs, L = 4 16, d_h = 256 (a smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "performance"),
                   help="output folder (default: paper_figures/performance)")
    p.add_argument("--redraw", action="store_true", help="redraw the figure from --out's implicit_features.csv")
    p.add_argument("--measure", choices=("implicit", "csr", "solve"), help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        args.route = args.measure
        measure(args)
        return 0
    if args.redraw:
        plot(pd.read_csv(os.path.join(args.out, "implicit_features.csv")), os.path.join(args.out, "implicit_features.png"))
        return 0
    if args.quick:
        args.pairs, args.lengths, args.hidden_size, args.vocab, args.solve_pairs = 1000, [4, 16], 256, 2000, 500
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as cache:
        t = time.perf_counter()
        make_cache(cache, args.pairs, max(args.lengths), args.hidden_size, args.vocab)
        print(f"cache: {args.pairs} pairs × 2 × {max(args.lengths)} tokens × {args.hidden_size} float16 "
              f"({2 * 2 * args.pairs * max(args.lengths) * args.hidden_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        for length in args.lengths:
            implicit = run_child(args, "implicit", length, cache)
            rows.append(implicit)
            print(f"L={length:3d} implicit: {implicit['iteration_s']:.3f} s/it, peak RSS "
                  f"{implicit['peak_rss_GiB']:.2f} GiB (cache {implicit['cache_GiB']:.2f}), CSR would be "
                  f"{implicit['csr_GiB_predicted']:.2f} GiB", flush=True)
            if implicit["csr_GiB_predicted"] <= args.csr_limit:
                csr = run_child(args, "csr", length, cache)
                rows.append(csr)
                print(f"L={length:3d} csr:      {csr['iteration_s']:.3f} s/it, peak RSS {csr['peak_rss_GiB']:.2f} GiB, "
                      f"build {csr['setup_s']:.1f} s", flush=True)
        solve = run_child(args, "solve", max(args.lengths), cache)
        rows.append(solve)
        print(f"certified GR-DPO solve, {solve['pairs']} pairs, L={solve['length']}: converged={solve['converged']} "
              f"gap={solve['gap']:.1e} (relative {solve['relative_gap']:.1e}), {solve['n_iter']} it, "
              f"{solve['passes']} passes, {solve['solve_s']:.1f} s, peak RSS {solve['peak_rss_GiB']:.2f} GiB", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(args.out, "implicit_features.csv"), index=False)
    plot(table, os.path.join(args.out, "implicit_features.png"))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
