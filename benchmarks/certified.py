"""The default ``solve``, certified: gap, accuracy against Clarabel, time and passes over S, in one table.

    python benchmarks/certified.py                   # every problem below (Clarabel at N = 10⁵ takes minutes)
    python benchmarks/certified.py --quick           # the small problems only
    python benchmarks/certified.py --no-clarabel     # ours only (no reference optimum, no timing ratio)

Problems × losses {DPO, IPO, hinge}, each solved by ``loglinear_grpo.solve`` with its defaults
(``estimator="auto"``, ``tol=1e-6``) and, in the same process, by ``loglinear_grpo.solve_exact``
(cvxpy + Clarabel, the epigraph form):

* the paper's group bandit (§5.1), scenarios (i)–(iii), N = 300, d = 4, K = 2, Θ = R^d, β = 1 (DPO)
  and 0.1 (IPO, hinge), as in Figures 2–4;
* a random problem with K = 3 unequal groups (400/120/40), d = 6, ‖s_i‖ ≤ 1, Bradley–Terry labels,
  Θ = ball of radius 4 (the one the certified-solve issue measured);
* random, K = 5, N = 10⁵, d = 64, Θ = ball of radius 4;
* random, K = 50, N = 10⁴, d = 16, Θ = ball of radius 4;
* the SmolLM2 GlobalOpinionQA last-layer head (sparse, d = 8640, Θ = ball of radius 1 around θ_ref,
  β = 0.1), when ``--llm-workdir`` holds extracted features.

Columns: certified gap (absolute and relative to max(1, |value|)) and whether it is within 10⁻⁶;
the measured relative error against Clarabel, (value − L*_Clarabel)/max(1, |L*|), and whether the gap
covers it (``valid``: value − L* ≤ gap + 10⁻⁷·max(1, |L*|), Clarabel's own accuracy); wall time; passes
over S (Newton: full products with S or Sᵀ, one fused pass for the gradients and Hessian); Clarabel's
time and status; the speed-up. Writes ``certified.csv`` and ``certified.md`` to ``--out``.
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
if "--tree" in sys.argv:                  # import loglinear_grpo from another source tree (before/after runs)
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))

import loglinear_grpo as lg  # noqa: E402
from loglinear_grpo.synthetic import SCENARIO_LABELS, disagreeing_groups, scenario_data  # noqa: E402

LOSSES = ("dpo", "ipo", "hinge")


def random_problem(sizes, dim, seed=0, scale=4.0, row_norm=1.0):
    """Unequal groups whose Bradley–Terry preferences disagree; ‖s_i‖ ≤ ``row_norm``."""
    return disagreeing_groups(sizes, dim, seed=seed, scale=scale, feature_scale=1.5 / np.sqrt(dim), row_norm=row_norm)


def problems(args):
    for scenario in ("imbalanced_sizes", "imbalanced_difficulty", "imbalanced_both"):
        _, train, _ = scenario_data(scenario, n=300, seed=0)
        yield f"bandit {SCENARIO_LABELS[scenario].split(' ')[0]}", train.data, {}, {"dpo": 1.0}
    yield "random K=3 (400/120/40)", random_problem((400, 120, 40), 6), {"radius": 4.0}, {}
    if args.quick:
        return
    rng = np.random.default_rng(1)
    sizes = np.maximum(1, (100_000 * rng.dirichlet(np.full(5, 2.0))).astype(int))
    yield "random K=5, N=1e5, d=64", random_problem(sizes, 64, seed=1), {"radius": 4.0}, {}
    sizes = np.maximum(20, (10_000 * rng.dirichlet(np.full(50, 2.0))).astype(int))
    yield "random K=50, N=1e4, d=16", random_problem(sizes, 16, seed=2), {"radius": 4.0}, {}
    if args.llm_workdir and os.path.exists(os.path.join(args.llm_workdir, "features.safetensors")):
        from llm_head.workdir import load_problem
        problem, _ = load_problem(args.llm_workdir, seed=0)
        yield ("SmolLM2 GlobalOpinionQA head (sparse, d=8640)", problem.data("train"),
               {"radius": 1.0, "center": problem.theta_ref}, {})


def run(args):
    import cvxpy  # noqa: F401  (imported before any timing)
    rows = []
    for name, data, theta_kw, betas in problems(args):
        for loss in args.losses:
            beta = betas.get(loss, 0.1)
            tic = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", lg.ConvergenceWarning)
                res = lg.solve(data, loss=loss, beta=beta, **theta_kw)
            ours = time.perf_counter() - tic
            row = {"problem": name, "N": data.n_samples, "d": data.dim, "K": data.n_groups, "loss": loss,
                   "beta": beta, "theta": "ball" if theta_kw else "R^d", "converged": res.converged,
                   "value": res.value, "gap": res.gap, "relative_gap": res.relative_gap,
                   "bound_kind": res.bound_kind, "iterations": res.n_iter, "passes": res.passes,
                   "seconds": ours}
            if args.clarabel:
                tic = time.perf_counter()
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        exact = lg.solve_exact(data, loss=loss, beta=beta, **theta_kw)
                    status = exact.status + (" (warned)" if caught else "")
                    optimum = exact.value
                except Exception as exc:                      # report, do not hide, a failed reference
                    status, optimum = f"failed: {type(exc).__name__}", np.nan
                row.update(clarabel_seconds=time.perf_counter() - tic, clarabel_status=status,
                           clarabel_value=optimum)
                scale = max(1.0, abs(optimum))
                row["error_vs_clarabel"] = (res.value - optimum) / scale
                row["valid"] = bool(res.value - optimum <= res.gap + 1e-7 * scale) if np.isfinite(optimum) else None
                row["speedup"] = row["clarabel_seconds"] / ours
            rows.append(row)
            print(_line(row), flush=True)
    return pd.DataFrame(rows)


def _line(row):
    text = (f"{row['problem']:48s} {row['loss']:5s} converged={row['converged']!s:5s} "
            f"gap={row['relative_gap']:.1e} ({row['bound_kind']}) {row['seconds']:7.2f}s passes={row['passes']}")
    if "clarabel_seconds" in row:
        text += (f" | Clarabel {row['clarabel_seconds']:7.2f}s [{row['clarabel_status']}] "
                 f"error={row['error_vs_clarabel']:+.1e} valid={row['valid']} ×{row['speedup']:.1f}")
    return text


def markdown(df):
    cols = ["problem", "loss", "converged", "relative_gap", "bound_kind", "seconds", "passes"]
    heads = ["problem", "loss", "converged", "certified relative gap", "bound", "ours (s)", "passes over S"]
    if "clarabel_seconds" in df:
        cols += ["error_vs_clarabel", "valid", "clarabel_seconds", "clarabel_status", "speedup"]
        heads += ["error vs Clarabel", "gap covers it", "Clarabel (s)", "Clarabel status", "speed-up"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c in ("relative_gap", "error_vs_clarabel"):
                cells.append(f"{v:.1e}")
            elif c in ("seconds", "clarabel_seconds"):
                cells.append(f"{v:.2f}")
            elif c == "speedup":
                cells.append(f"{v:.1f}×")
            elif c == "passes":
                cells.append("—" if r["loss"] == "hinge" else str(int(v)))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small problems only")
    parser.add_argument("--no-clarabel", dest="clarabel", action="store_false", help="skip the cvxpy reference")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--llm-workdir", default=os.path.join(ROOT, "results", "llm"),
                        help="llm_head work folder with extracted GlobalOpinionQA features (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "certified"),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--tree", help="import loglinear_grpo from this source tree (to compare two versions)")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    df = run(args)
    os.makedirs(args.out, exist_ok=True)
    df.to_csv(os.path.join(args.out, "certified.csv"), index=False)
    text = markdown(df)
    with open(os.path.join(args.out, "certified.md"), "w") as fh:
        fh.write(text)
    print("\n" + text)
    print(f"{time.perf_counter() - tic:.0f} s in all -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
