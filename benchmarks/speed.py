"""Speed and scale of the solvers, measured against the machine's own limits.

    python benchmarks/speed.py [--quick] [--out paper_figures/performance]

1. full-batch solve at the paper's size (N=300, d=4, K=2) vs a bare NumPy loop of the same
   update, identical iterates asserted (goal ≤ 1.2×);
2. one full-batch iteration at N=10^6, d=64, K=5 vs one NumPy pass over S (``S @ θ``; goal ≥ 50%,
   aim 80%), float64 and float32, groups in random order and sorted by group; float32 vs float64;
3. Algorithm 1 with one pair per step vs a bare NumPy loop (identical iterates asserted), and
   stochastic iterations per second vs batch size;
4. closed-form GR-IPO alternation time vs d and N;
5. time to a certified relative gap of 10⁻⁶ with the default solve at N=10^6, d=64, K=5 (DPO, IPO)
   and the passes over S it took; Clarabel's time at N = 10^4 … 10^5 in the same run;
6. a memory-mapped float32 S of 2·10^7 × 32 (2.4 GB): one full-batch iteration against one streamed
   pass over the file, and the resident memory;
7. how the cost of one iteration grows with N, d and K (one log–log panel per axis, full-batch
   and stochastic estimators; ``--scaling-only`` runs just this);
8. where the time of item 2 goes, in ns per pair: the first product, the loss terms, the
   group-gradient product (``--breakdown-only`` runs just this).

Prints a table and writes ``speed.csv``, ``scaling.csv`` and ``scaling.png`` to ``--out``. Timings are the
best of several repeats; this machine is shared, so read them as ±10%.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
if "--tree" in sys.argv:                  # import loglinear_grpo from another source tree (before/after runs)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))

import loglinear_grpo as lg  # noqa: E402
from _bare import bare_full_batch_dpo, bare_stochastic_dpo  # noqa: E402


def best_of(fn, repeats=5):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def paper_size(rows, steps):
    """The paper's size: the toolkit's full-batch solve vs a bare NumPy loop of the same update."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(300, 4))
    g = (rng.random(300) < 0.2).astype(int)
    data = lg.PreferenceData(s, g)
    kw = dict(loss="dpo", beta=1.0, estimator="full", steps=steps, step_size=0.5, alpha_step_size=0.5, radius=1.0,
              tol=None)
    bare = best_of(lambda: bare_full_batch_dpo(s, g, steps, 0.5, 0.5, radius=1.0), 5)
    ours = best_of(lambda: lg.solve(data, **kw, log_every=steps), 5)
    logged = best_of(lambda: lg.solve(data, **kw), 3)
    t_b, _ = bare_full_batch_dpo(s, g, steps, 0.5, 0.5, radius=1.0)
    assert np.array_equal(t_b, lg.solve(data, **kw, log_every=steps).theta_avg), \
        "the toolkit and the bare loop must compute the same iterates"
    rows.append({"case": "paper size N=300 d=4 K=2", "what": f"{steps} full-batch iterations (solve, certificate included)",
                 "toolkit_s": ours, "reference_s": bare, "ratio": ours / bare,
                 "note": f"vs a bare NumPy loop of the same update, identical iterates (goal ≤ 1.2); with the "
                         f"default history (100 rows): {logged / bare:.2f}"})
    step_calls(rows, bare / steps)


def step_calls(rows, bare_iteration):
    """The cost of one call of each of Algorithm 1's step functions (``loglinear_grpo.steps``) at the paper's
    size, against one iteration of the bare loop: what writing the steps once costs the fast loops."""
    try:
        from loglinear_grpo import steps as st
    except ImportError:                     # a tree from before the steps were written once
        return
    theta_set = lg.L2Ball(1.0)
    size = lg.StepSize("constant", 0.5)
    log_alpha, losses = np.log(np.full(2, 0.5)), np.array([0.6, 0.7])
    theta, grad, alpha = np.full(4, 0.1), np.full(4, 1e-3), np.array([0.4, 0.6])
    calls = 20_000
    cases = {
        "mirror_ascent (α step, lines 7-8)": lambda: st.mirror_ascent(log_alpha, 0.0, losses, size, 1),
        "projected_step (θ step, line 9)": lambda: st.projected_step(theta, grad, 0.0, theta_set, size, 1),
        "mixing_weights (λ, χ = 0.5)": lambda: st.mixing_weights(alpha, 0.5),
    }
    for name, fn in cases.items():
        t = best_of(lambda: [fn() for _ in range(calls)], 3) / calls
        rows.append({"case": "paper size N=300 d=4 K=2", "what": f"one call: {name}", "toolkit_s": t,
                     "reference_s": bare_iteration, "ratio": t / bare_iteration,
                     "note": "ratio = share of one bare-loop iteration"})


def large(rows, n, d, k=5):
    """One full-batch iteration at N×d against one NumPy pass S @ θ of the same dtype; groups stored
    in random order and group by group (PreferenceData.sorted_by_group)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d))
    groups = rng.integers(0, k, n)
    theta = rng.standard_normal(d) * 0.1
    times = {}
    for dtype in (np.float64, np.float32):
        s = base.astype(dtype)
        unsorted = lg.PreferenceData(s, groups, check_finite=False)
        ordered, _ = unsorted.sorted_by_group()
        one_pass = best_of(lambda: s @ theta.astype(dtype))
        for order, data in (("random order", unsorted), ("sorted by group", ordered)):
            cfg = lg.make_config(data, loss="dpo", estimator="full", steps=10, step_size=0.1, alpha_step_size=0.1,
                                 tol=None)
            state, workspace = lg.init(data, cfg), lg.kernels.Workspace(data)
            it = best_of(lambda: lg.update(state, data, cfg, workspace=workspace))
            times[(dtype, order)] = it
            rows.append({"case": f"N={n:.0e} d={d} K={k} {np.dtype(dtype).name}, {order}",
                         "what": "one full-batch iteration", "toolkit_s": it, "reference_s": one_pass,
                         "ratio": one_pass / it,
                         "note": f"share of one NumPy pass S@θ (goal ≥ 0.5, aim 0.8); pass = "
                                 f"{s.nbytes / one_pass / 1e9:.1f} GB/s"})
    for order in ("random order", "sorted by group"):
        rows.append({"case": f"N={n:.0e} d={d} K={k}, {order}", "what": "float32 vs float64 iteration",
                     "toolkit_s": times[(np.float32, order)], "reference_s": times[(np.float64, order)],
                     "ratio": times[(np.float32, order)] / times[(np.float64, order)],
                     "note": "time ratio float32 / float64 (the same iteration on half the bytes)"})


def breakdown(rows, n, d, k=5):
    """Where one full-batch DPO iteration's time goes, per pair (ns), against the pass S @ θ: the
    blocked first product alone, the per-pair loss terms (ℓ, ℓ' of DPO: one exp, one log and seven
    cheap ufuncs), the group-gradient product (sorted groups: one gemv per run; random groups: the
    K × rows weight matrix and its product), and the whole iteration."""
    from loglinear_grpo import kernels
    rng = np.random.default_rng(0)
    groups = np.sort(rng.integers(0, k, n))
    theta = rng.standard_normal(d) * 0.1
    for dtype in (np.float64, np.float32):
        s = rng.standard_normal((n, d)).astype(dtype)
        data = lg.PreferenceData(s, groups, check_finite=False)
        ws = kernels.Workspace(data)
        m = ws.rows
        th = theta.astype(dtype)
        blocks = [(a, min(a + m, n)) for a in range(0, n, m)]
        h = np.empty(n)

        def first_product():
            for a, b in blocks:
                np.dot(s[a:b], th, out=ws.h[:b - a])

        def loss_terms():
            for a, b in blocks:
                kernels._dpo_block(h[a:b], 0.1, ws, b - a)

        deriv = rng.standard_normal(n).astype(dtype)

        def group_products_sorted():
            for a, b in blocks:
                deriv[a:b] @ s[a:b]                      # one run per block (groups sorted)

        g = rng.integers(0, k, m)

        def group_products_random():
            for a, b in blocks:
                w = ws.weights[:, :b - a]
                w.fill(0.0)
                w[g[:b - a], ws.columns[:b - a]] = deriv[a:b]
                w @ s[a:b]

        parts = {"pass S@θ (reference)": lambda: s @ th, "blocked first product": first_product,
                 "loss terms ℓ, ℓ' (DPO)": loss_terms, "group gradients, sorted groups": group_products_sorted,
                 "group gradients, random groups": group_products_random,
                 "whole iteration (sorted)": lambda: kernels.losses_and_group_gradients(theta, data, "dpo", 0.1, ws)}
        for what, fn in parts.items():
            t = best_of(fn, 5)
            rows.append({"case": f"N={n:.0e} d={d} K={k} {np.dtype(dtype).name}", "what": f"breakdown: {what}",
                         "toolkit_s": t, "reference_s": np.nan, "ratio": t / n * 1e9,
                         "note": "ratio = ns per pair"})


def stochastic(rows, steps):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(100_000, 32))
    groups = rng.integers(0, 5, 100_000)
    data = lg.PreferenceData(s, groups)
    cfg = lg.make_config(data, loss="dpo", beta=1.0, estimator="stochastic", steps=steps, step_size=0.01,
                         alpha_step_size=0.01, radius=1.0, tol=None)
    cache = {}
    index = np.concatenate([lg.sample_batch(cfg, t, cache) for t in range(steps)])
    state = lg.init(data, cfg)
    bare = best_of(lambda: bare_stochastic_dpo(s, groups, data.ref_margin, index, 0.01, 0.01, radius=1.0), 3)
    ours = best_of(lambda: lg.solver._single_pair_run(state, data, cfg, steps, {}), 3)
    run = lg.solver._single_pair_run(state, data, cfg, steps, {})
    assert np.array_equal(lg.averaged_theta(run), bare_stochastic_dpo(s, groups, data.ref_margin, index, 0.01, 0.01,
                                                                     radius=1.0)[0]), "iterates differ"
    rows.append({"case": "N=1e5 d=32 K=5", "what": f"{steps} stochastic steps, batch 1", "toolkit_s": ours,
                 "reference_s": bare, "ratio": ours / bare,
                 "note": "vs a bare NumPy loop of Algorithm 1, identical iterates (solve's steps between its logs)"})
    for b in (1, 8, 64, 512):
        t = best_of(lambda: lg.solve(data, loss="dpo", estimator="stochastic", steps=steps, batch_size=b,
                                     step_size=0.01, alpha_step_size=0.01, log_every=steps, radius=1.0), 2)
        rows.append({"case": "N=1e5 d=32 K=5", "what": f"stochastic solve, batch {b}", "toolkit_s": t / steps,
                     "reference_s": np.nan, "ratio": steps / t,
                     "note": "ratio = iterations per second, the final certificate included"})


def closed_form(rows):
    rng = np.random.default_rng(0)
    for n, d in [(10_000, 4), (10_000, 32), (10_000, 128), (10_000, 512), (1_000, 64), (100_000, 64)]:
        data = lg.PreferenceData(rng.normal(size=(n, d)), rng.integers(0, 3, n))
        cfg = lg.make_config(data, loss="ipo", estimator="closed_form", steps=5, alpha_step_size=0.01)
        state = lg.init(data, cfg)
        setup = best_of(lambda: lg.make_config(data, loss="ipo", estimator="closed_form", steps=5,
                                               alpha_step_size=0.01), 2)
        t = best_of(lambda: lg.update(state, data, cfg))
        rows.append({"case": f"N={n} d={d} K=3", "what": "closed-form GR-IPO alternation",
                     "toolkit_s": t, "reference_s": setup, "ratio": np.nan,
                     "note": "reference_s = one-off Gram set-up O(N d^2); a step is O(N d + K d^2 + d^3)"})


def certified(rows, n, d, k=5, clarabel_sizes=(10_000, 30_000, 100_000)):
    """Time to a certified relative gap of 1e-6 with the default solve, and passes over S; Clarabel's
    time at smaller N in the same run, and how it grows with N."""
    sys.path.insert(0, HERE)
    from certified import random_problem
    rng = np.random.default_rng(1)
    sizes = np.maximum(1, (n * rng.dirichlet(np.full(k, 2.0))).astype(int))
    data = random_problem(sizes, d, seed=1)
    for loss in ("dpo", "ipo"):
        tic = time.perf_counter()
        res = lg.solve(data, loss=loss, radius=4.0)
        seconds = time.perf_counter() - tic
        rows.append({"case": f"N={data.n_samples:.0e} d={d} K={k}", "what": f"default solve, {loss}",
                     "toolkit_s": seconds, "reference_s": np.nan, "ratio": res.passes,
                     "note": f"ratio = passes over S; converged={res.converged}, relative gap {res.relative_gap:.1e}"})
    import cvxpy  # noqa: F401
    for m in clarabel_sizes:
        part = random_problem(np.maximum(1, (m * rng.dirichlet(np.full(k, 2.0))).astype(int)), d, seed=2)
        for loss in ("dpo", "ipo"):
            tic = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exact = lg.solve_exact(part, loss=loss, radius=4.0)
            clarabel = time.perf_counter() - tic
            tic = time.perf_counter()
            ours = lg.solve(part, loss=loss, radius=4.0)
            rows.append({"case": f"N={part.n_samples:.0e} d={d} K={k}", "what": f"Clarabel vs default solve, {loss}",
                         "toolkit_s": time.perf_counter() - tic, "reference_s": clarabel,
                         "ratio": clarabel / (time.perf_counter() - tic),
                         "note": f"ratio = speed-up; Clarabel status {exact.status}; ours converged={ours.converged}"})


def _proc_status():
    """Resident memory split (MiB): anonymous (heap: real RAM use) and file-backed (page cache of
    the mapped file, reclaimable by the kernel at any time)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def memmap_worker(n, d, steps, folder):
    """Run in a fresh process so its peak-memory readings start clean; prints one line."""
    import tracemalloc
    path = os.path.join(folder, "S.f32")
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1_000_000):
        stop = min(start + 1_000_000, n)
        mm[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
    mm.flush()
    del mm
    groups = rng.integers(0, 4, n)
    tracemalloc.start()
    t = time.perf_counter()
    data = lg.PreferenceData(np.memmap(path, dtype=np.float32, mode="r", shape=(n, d)), groups)
    check = time.perf_counter() - t
    t = time.perf_counter()
    res = lg.solve(data, loss="dpo", estimator="stochastic", steps=steps, batch_size=64, step_size=0.01,
                   alpha_step_size=0.01, log_every=steps + 1, tol=None)
    elapsed = time.perf_counter() - t
    assert np.all(np.isfinite(res.theta_last))
    # one full-batch iteration against one streamed pass S @ θ over the same file (both warm)
    theta = np.full(d, 0.01, dtype=np.float32)
    block = 1 << 16

    def streamed_pass():
        for start in range(0, n, block):
            np.asarray(data.diff[start:start + block]) @ theta

    cfg = lg.make_config(data, loss="dpo", estimator="full", steps=2, step_size=0.01, alpha_step_size=0.01, tol=None)
    state, workspace = lg.init(data, cfg), lg.kernels.Workspace(data)
    passes = [], []
    for _ in range(2):
        t = time.perf_counter(); streamed_pass(); passes[0].append(time.perf_counter() - t)
        t = time.perf_counter(); lg.update(state, data, cfg, workspace=workspace); passes[1].append(time.perf_counter() - t)
    heap_peak = tracemalloc.get_traced_memory()[1] / 2**20
    status = _proc_status()
    print(repr({"elapsed": elapsed, "check": check, "heap_peak": heap_peak, "pass": min(passes[0]),
                "iteration": min(passes[1]), **status}))


def memmap(rows, n, d, steps, folder):
    import ast
    import subprocess
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memmap-worker", str(n), str(d),
                          str(steps), folder], check=True, capture_output=True, text=True).stdout
    m = ast.literal_eval(out.strip().splitlines()[-1])
    size_mb = n * d * 4 / 2**20
    rows.append({"case": f"memmap N={n:.0e} d={d} float32 ({size_mb:.0f} MiB)",
                 "what": "one full-batch iteration", "toolkit_s": m["iteration"], "reference_s": m["pass"],
                 "ratio": m["pass"] / m["iteration"],
                 "note": "share of one streamed pass S@θ over the file (the iteration reads each block once)"})
    rows.append({"case": f"memmap N={n:.0e} d={d} float32 ({size_mb:.0f} MiB)",
                 "what": f"{steps} stochastic steps, batch 64, then the full-batch iterations",
                 "toolkit_s": m["elapsed"], "reference_s": m["check"], "ratio": m["RssAnon"] / size_mb,
                 "note": (f"ratio = anonymous RSS / file size; RssAnon {m['RssAnon']:.0f} MiB, "
                          f"Python heap peak {m['heap_peak']:.0f} MiB, reclaimable file pages RssFile "
                          f"{m['RssFile']:.0f} MiB; reference_s = streamed finiteness check")})


SCALING_AXES = {
    "N": [(n, 16, 4) for n in (10**3, 10**4, 10**5, 10**6)],
    "d": [(10**4, d, 4) for d in (4, 16, 64, 256, 1024)],
    "K": [(10**5, 16, k) for k in (2, 10, 100, 1000, 10000)],
}


def scaling(quick=False):
    """Seconds per iteration (full batch; stochastic with batch 64) along each axis, others fixed."""
    rng = np.random.default_rng(0)
    rows = []
    for axis, points in SCALING_AXES.items():
        for n, d, k in points:
            if quick and n * d > 10**6:
                continue
            data = lg.PreferenceData(rng.standard_normal((n, d)), np.arange(n) % k)
            for estimator, batch in (("full", 1), ("stochastic", 64)):
                cfg = lg.make_config(data, loss="dpo", estimator=estimator, steps=10, batch_size=batch,
                                     step_size=0.01, alpha_step_size=0.01, tol=None)
                state = lg.init(data, cfg)
                workspace = lg.kernels.Workspace(data) if estimator == "full" else None
                batch = lg.sample_batch(cfg, 0, {}) if estimator == "stochastic" else None
                t = best_of(lambda: lg.update(state, data, cfg, batch, workspace), 3 if estimator == "full" else 20)
                rows.append({"axis": axis, "N": n, "d": d, "K": k, "estimator": estimator, "seconds": t})
    return pd.DataFrame(rows)


def plot_scaling(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, axis in zip(axes, SCALING_AXES):
        sub = table[table.axis == axis]
        if sub.empty:
            ax.set_visible(False)
            continue
        fixed = {a: sub[a].iloc[0] for a in ("N", "d", "K") if a != axis}
        for estimator, tab in sub.groupby("estimator"):
            x, y = tab[axis].to_numpy(float), tab["seconds"].to_numpy()
            slope = np.polyfit(np.log(x), np.log(y), 1)[0] if len(x) > 1 else np.nan
            ax.loglog(x, y * 1e3, "o-", label=f"{estimator} (log-log slope {slope:.2f})")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per iteration")
        ax.set_title(f"vs {axis} (" + ", ".join(f"{a}={v:g}" for a, v in fixed.items()) + ")")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Cost of one iteration (DPO, group robust), 2-core machine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_and_save(rows, path):
    """Print the table of ``rows`` and write it as CSV to ``path``; 0 (the exit status)."""
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 90)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table.to_csv(path, index=False)
    return 0


def run_items(args):
    """Only the items asked for (``--items``), into ``speed_items.csv``."""
    n = 10**5 if args.quick else 10**6
    items = {
        1: lambda rows: paper_size(rows, 2000 if args.quick else 20000),
        2: lambda rows: large(rows, n, 64),
        3: lambda rows: stochastic(rows, 500 if args.quick else 20000),
        4: closed_form,
        5: lambda rows: certified(rows, n, 64, clarabel_sizes=(3000, 10_000) if args.quick else (10_000, 30_000, 100_000)),
        8: lambda rows: breakdown(rows, n, 64),
    }
    rows = []
    for item in args.items:
        if item == 6:
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                memmap(rows, 10**6 if args.quick else 2 * 10**7, 32, 500 if args.quick else 5000, tmp)
        elif item == 7:
            print(scaling(args.quick).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        else:
            items[item](rows)
    return print_and_save(rows, os.path.join(args.out, "speed_items.csv"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "paper_figures", "performance"),
                        help="output folder (default: paper_figures/performance)")
    parser.add_argument("--scaling-only", action="store_true", help="run item 7 only")
    parser.add_argument("--breakdown-only", action="store_true", help="run item 8 only")
    parser.add_argument("--items", nargs="+", type=int, choices=range(1, 9), metavar="N",
                        help="run only these items (numbered as above; writes speed_items.csv)")
    parser.add_argument("--tree", help="import loglinear_grpo from this source tree (to compare two versions)")
    parser.add_argument("--memmap-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memmap_worker:
        n, d, steps, folder = args.memmap_worker
        memmap_worker(int(n), int(d), int(steps), folder)
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.items:
        return run_items(args)
    if args.breakdown_only:
        rows = []
        breakdown(rows, 10**5 if args.quick else 10**6, 64)
        table = pd.DataFrame(rows)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        table.to_csv(os.path.join(args.out, "breakdown.csv"), index=False)
        return 0
    table = scaling(args.quick)
    table.to_csv(os.path.join(args.out, "scaling.csv"), index=False)
    plot_scaling(table, os.path.join(args.out, "scaling.png"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.scaling_only:
        return 0
    rows = []
    paper_size(rows, 2000 if args.quick else 20000)
    large(rows, 10**5 if args.quick else 10**6, 64)
    breakdown(rows, 10**5 if args.quick else 10**6, 64)
    stochastic(rows, 500 if args.quick else 20000)
    closed_form(rows)
    certified(rows, 10**5 if args.quick else 10**6, 64,
              clarabel_sizes=(3000, 10_000) if args.quick else (10_000, 30_000, 100_000))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        memmap(rows, 10**6 if args.quick else 2 * 10**7, 32, 500 if args.quick else 5000, tmp)
    return print_and_save(rows, os.path.join(args.out, "speed.csv"))


if __name__ == "__main__":
    raise SystemExit(main())
