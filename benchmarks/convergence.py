"""Proposition 3 measured: the O(T^-1/2) rate of Algorithm 1, on two problems and three losses.

    python benchmarks/convergence.py [--quick] [--seeds 10] [--out paper_figures/convergence]

For each problem (the paper's ``swapped`` bandit, scenario "imbalanced_sizes", and a random
problem with K = 5 groups of unequal size), each loss (DPO, IPO, hinge) and Θ = the L2 ball of
radius 2 (Proposition 3's setting):

* **stochastic** — Algorithm 1 (``estimator="stochastic"``, one pair per step) with the theory
  step sizes of :func:`loglinear_grpo.theory_step_sizes` (``scale=1``) and with both steps
  multiplied by 10 (``scale=10``: the same η ∝ 1/√T schedule, whose bound differs only by the
  constant), for T on a geometric grid 10^2 … 10^5, R seeds each. Measured at the averaged iterate:
  suboptimality :math:`\\max_g L_g(\\bar\\theta_T) - L^*` (L* from :func:`~loglinear_grpo.solve_exact`)
  and duality gap :math:`\\max_g L_g(\\bar\\theta_T) - \\min_\\theta\\sum_g\\bar\\alpha_g L_g(\\theta)`.
* **full** — the full-batch estimator with its own theory steps (deterministic, one run per T),
  at the same multipliers.
* **closed_form** — GR-IPO: α mirror ascent (theory η_α, same multipliers) alternated with the
  exact weighted least squares; suboptimality and duality gap vs number of alternations.

The rate is the least-squares slope of log E[subopt] on log T, with a bootstrap 95% CI over seeds
(seeds resampled with replacement, 2000 times). Two fits are reported: over the whole grid, and over
the last two decades (T ≥ 10^3), where the pre-asymptotic phase (θ̄ has not yet left θ⁽⁰⁾'s
neighbourhood; α has not yet separated the groups) is over. Writes ``convergence.csv`` (raw
numbers), ``slopes.csv`` / ``slopes.md`` and ``convergence.png`` / ``duality_gap.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import loglinear_grpo as lg  # noqa: E402
from loglinear_grpo.synthetic import scenario_data  # noqa: E402

RADIUS = 2.0
BETA = 1.0
LOSSES = ("dpo", "ipo", "hinge")
PROBLEMS = ("bandit", "random", "overlapping")
TAIL_FROM = 1e3


def random_problem(sizes=(300, 200, 120, 80, 50), dim=8, seed=0, scale=4.0):
    """K groups of unequal size whose Bradley–Terry preferences disagree; ‖s_i‖ ≤ 1."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    rows, groups = [], []
    for g, n in enumerate(sizes):
        w = base + rng.normal(size=dim)
        w *= scale / np.linalg.norm(w)
        s = rng.normal(size=(n, dim)) * (1.5 / np.sqrt(dim))
        s /= np.maximum(1.0, np.linalg.norm(s, axis=1))[:, None]
        preferred = rng.random(n) < 1.0 / (1.0 + np.exp(-(s @ w)))
        s[~preferred] *= -1.0
        rows.append(s)
        groups.append(np.full(n, g))
    return lg.PreferenceData(np.vstack(rows), np.concatenate(groups),
                             group_names=[f"group{g}" for g in range(len(sizes))])


def overlapping_problem(seed=0):
    """The random problem with a second grouping of 3 unequal groups beside its 5: their union, 8
    overlapping groups (every pair in two; :mod:`loglinear_grpo.groups`), where Algorithm 1 draws
    g ~ Cat(N_g/T), T = Σ_h N_h, and Proposition 3's constants hold with N replaced by T."""
    base = random_problem(seed=seed)
    rng = np.random.default_rng(seed + 1)
    second = rng.choice(3, base.n_samples, p=[0.6, 0.3, 0.1])
    return lg.PreferenceData(base.diff, {"g": base.groups, "h": second}, base.ref_margin)


def make_problem(name):
    if name == "bandit":
        _, train, _ = scenario_data("imbalanced_sizes", n=300, seed=0)
        return train.data
    if name == "overlapping":
        return overlapping_problem()
    return random_problem()


def t_grid(t_min, t_max, per_decade=2):
    n = int(round(np.log10(t_max / t_min) * per_decade)) + 1
    return np.unique(np.round(np.logspace(np.log10(t_min), np.log10(t_max), n)).astype(int))


def _optimum(data, loss):
    return lg.solve_exact(data, loss=loss, beta=BETA, radius=RADIUS).value


def _measure(data, loss, result, optimum):
    """Suboptimality of the returned θ (θ̄_T for Algorithm 1) and its certified duality gap."""
    return {"worst_loss": result.value, "subopt": result.value - optimum, "gap": result.gap}


def _bound(config, scale):
    """Proposition 3's bound for steps ``scale`` × the theory steps: Nemirovski et al. (2009, §3.1)
    give max(c, 1/c)·2M_*√(5/T) for the stochastic estimator; the regret bounds give (c + 1/c)/2 times
    the full-batch bound. No bound is claimed for the closed-form alternation."""
    if config.estimator == "closed_form":
        return np.nan
    factor = max(scale, 1.0 / scale) if config.estimator == "stochastic" else 0.5 * (scale + 1.0 / scale)
    return factor * config.theory["gap_bound"]


def _scaled(config, scale):
    """The same run with both theory steps multiplied by ``scale`` (one make_config per run)."""
    theta_step = None if config.theta_step is None else lg.StepSize("constant", scale * config.theta_step.scale)
    return config.replace(theta_step=theta_step, alpha_step=lg.StepSize("constant", scale * config.alpha_step.scale))


def stochastic_job(args):
    """All T of the grid for one (problem, loss, scale, seed)."""
    problem, loss, scale, seed, grid = args
    data = make_problem(problem)
    optimum = _optimum(data, loss)
    rows = []
    for t in grid:
        config = _scaled(lg.make_config(data, loss=loss, beta=BETA, estimator="stochastic", steps=int(t),
                                        radius=RADIUS, seed=seed), scale)
        tic = time.perf_counter()
        result = lg.solve(data, config, log_every=int(t))
        rows.append({"problem": problem, "loss": loss, "estimator": "stochastic", "scale": scale,
                     "seed": seed, "T": int(t), "eta_theta": config.theta_step.scale,
                     "eta_alpha": config.alpha_step.scale, "bound": _bound(config, scale),
                     "seconds": time.perf_counter() - tic, **_measure(data, loss, result, optimum)})
    return rows


def deterministic_job(args):
    """Full-batch (theory steps) or closed-form GR-IPO, one run per T, all T iterations (tol=None)."""
    problem, loss, estimator, scale, grid = args
    data = make_problem(problem)
    optimum = _optimum(data, loss)
    rows = []
    for t in grid:
        step = None if estimator == "closed_form" else "theory"
        config = _scaled(lg.make_config(data, loss=loss, beta=BETA, estimator=estimator, steps=int(t),
                                        radius=RADIUS, step_size=step, alpha_step_size="theory", tol=None), scale)
        result = lg.solve(data, config, log_every=int(t))
        rows.append({"problem": problem, "loss": loss, "estimator": estimator, "scale": scale, "seed": 0,
                     "T": int(t), "eta_theta": np.nan if config.theta_step is None else config.theta_step.scale,
                     "eta_alpha": config.alpha_step.scale, "bound": _bound(config, scale),
                     **_measure(data, loss, result, optimum)})
    return rows


# ============================================================================ slopes
def loglog_slope(t, y):
    """Least-squares slope and intercept of log y on log T (y > 0)."""
    x = np.log(np.asarray(t, dtype=float))
    slope, intercept = np.polyfit(x, np.log(np.asarray(y, dtype=float)), 1)
    return float(slope), float(intercept)


def bootstrap_slope(table, value="subopt", t_min=0, n_boot=2000, seed=0):
    """Slope of log mean_seeds(value) on log T, with a percentile-bootstrap 95% CI over seeds.

    ``table``: one row per (seed, T). Seeds are resampled with replacement as whole
    trajectories, so the CI reflects the seed-to-seed variability of E[value].
    """
    wide = table[table["T"] >= t_min].pivot(index="seed", columns="T", values=value)
    ts, values = wide.columns.to_numpy(), wide.to_numpy()
    slope, _ = loglog_slope(ts, values.mean(axis=0))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = np.maximum(values[picks].mean(axis=1), 1e-300)
    x = np.log(ts.astype(float))
    xc = x - x.mean()
    boot = (np.log(means) @ xc) / (xc @ xc)
    low, high = np.percentile(boot, [2.5, 97.5])
    return slope, float(low), float(high)


def slope_table(raw):
    out = []
    for (problem, loss, estimator, scale), tab in raw.groupby(["problem", "loss", "estimator", "scale"]):
        for value in ("subopt", "gap"):
            for label, t_min in (("all T", 0), (f"T ≥ {TAIL_FROM:.0e}", TAIL_FROM)):
                sub = tab[tab["T"] >= t_min]
                if sub["T"].nunique() < 2:
                    continue
                if estimator == "stochastic":
                    slope, low, high = bootstrap_slope(sub, value)
                else:
                    slope, _ = loglog_slope(sub["T"], np.maximum(sub[value], 1e-300))
                    low = high = np.nan
                out.append({"problem": problem, "loss": loss, "estimator": estimator, "scale": scale,
                            "measure": value, "fit": label, "slope": slope, "ci_low": low,
                            "ci_high": high, "seeds": tab["seed"].nunique(),
                            "meets_rate": bool((low if np.isfinite(low) else slope) <= -0.5)})
    return pd.DataFrame(out)


# ============================================================================ figures
def draw(raw, slopes, value, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = [p for p in PROBLEMS if p in set(raw.problem)]
    losses = [loss for loss in LOSSES if loss in set(raw.loss)]
    fig, axes = plt.subplots(len(problems), len(losses), figsize=(4.2 * len(losses) + 1, 3.6 * len(problems)),
                             squeeze=False)
    colors = {"stochastic": "C0", "full": "C2", "closed_form": "C3"}
    names = {"stochastic": "Alg. 1", "full": "full batch", "closed_form": "closed form"}
    for i, problem in enumerate(problems):
        for j, loss in enumerate(losses):
            ax = axes[i, j]
            tab = raw[(raw.problem == problem) & (raw.loss == loss)]
            anchor = None
            for (estimator, scale), sub in tab.groupby(["estimator", "scale"]):
                stats = sub.groupby("T")[value].agg(["mean", "std", "count"])
                mean = stats["mean"].to_numpy()
                half = 1.96 * stats["std"].fillna(0).to_numpy() / np.sqrt(stats["count"].to_numpy())
                fit = slopes[(slopes.problem == problem) & (slopes.loss == loss) &
                             (slopes.estimator == estimator) & (slopes.scale == scale) &
                             (slopes.measure == value) & (slopes.fit != "all T")]
                label = names[estimator] + (", theory η" if scale == 1 else f", {scale:g}× theory η")
                style = dict(color=colors[estimator], alpha=1.0 if scale == 1 else 0.55)
                if len(fit):
                    f = fit.iloc[0]
                    label += f" (slope {f.slope:.2f}" + (
                        f" [{f.ci_low:.2f}, {f.ci_high:.2f}])" if np.isfinite(f.ci_low) else ")")
                ts = stats.index.to_numpy()
                ax.plot(ts, mean, "o-" if scale == 1 else "s-", ms=3.5, label=label, **style)
                if estimator == "stochastic":
                    ax.fill_between(ts, np.maximum(mean - half, mean * 1e-3), mean + half,
                                    color=colors[estimator], alpha=0.2, lw=0)
                    if len(fit):
                        tail = ts[ts >= TAIL_FROM]
                        _, icpt = loglog_slope(tail, mean[ts >= TAIL_FROM])
                        ax.plot(tail, np.exp(icpt) * tail ** f.slope, "--", lw=1, **style)
                    if scale == 1.0:
                        anchor = (ts[0], mean[0])
            if anchor is not None:
                ts = np.array([tab["T"].min(), tab["T"].max()], dtype=float)
                ax.plot(ts, anchor[1] * (ts / anchor[0]) ** -0.5, ":", color="k", lw=1.2, label="∝ T^-1/2")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{problem} — {loss.upper()}")
            ax.set_xlabel("T (iterations / alternations)")
            ax.set_ylabel("suboptimality of θ̄_T" if value == "subopt" else "duality gap at (θ̄_T, ᾱ_T)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6.5, loc="lower left")
    fig.suptitle("Proposition 3: " + ("E[max_g L_g(θ̄_T)] − L*" if value == "subopt" else "duality gap")
                 + " — mean over seeds, 95% band; dashed: fit on T ≥ 10^3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(slopes):
    tab = slopes[slopes.measure == "subopt"].copy()
    lines = ["| problem | loss | estimator | η | fit | slope | 95% CI | ≤ −0.5 in CI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in tab.itertuples():
        ci = f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if np.isfinite(r.ci_low) else "(deterministic)"
        eta = "theory" if r.scale == 1.0 else f"{r.scale:g}× theory"
        lines.append(f"| {r.problem} | {r.loss} | {r.estimator} | {eta} | {r.fit} | {r.slope:.3f} | {ci} | "
                     f"{'yes' if r.meets_rate else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T ≤ 10^3.5, 3 seeds (a smoke run)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--t-max", type=float, default=1e5)
    parser.add_argument("--scales", default="1,10", help="multipliers of the theory steps (stochastic)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--no-deterministic", action="store_true", help="skip the full-batch and closed-form runs")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "paper_figures", "convergence"))
    parser.add_argument("--redraw", action="store_true", help="redraw from the saved convergence.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.t_max = min(args.seeds, 3), min(args.t_max, 10 ** 3.5)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the CI resamples seeds)")
    os.makedirs(args.out, exist_ok=True)
    csv = os.path.join(args.out, "convergence.csv")

    if args.redraw:
        raw = pd.read_csv(csv)
    else:
        from tqdm.auto import tqdm
        grid = t_grid(1e2, args.t_max)
        scales = [float(s) for s in args.scales.split(",")]
        jobs = [(p, loss, s, seed, grid) for p in args.problems for loss in args.losses for s in scales
                for seed in range(args.seeds)]
        det = [(p, loss, "full", s, grid) for p in args.problems for loss in args.losses for s in scales]
        det += [(p, "ipo", "closed_form", s, t_grid(1, min(args.t_max, 1e4))) for p in args.problems
                for s in scales if "ipo" in args.losses]
        if args.no_deterministic:
            det = []
        tic = time.perf_counter()
        rows = []
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(stochastic_job, j) for j in jobs]
            futures += [pool.submit(deterministic_job, j) for j in det]
            for fut in tqdm(futures, desc="runs", unit="run"):
                rows.extend(fut.result())
        raw = pd.DataFrame(rows)
        raw.to_csv(csv, index=False)
        print(f"{len(jobs) + len(det)} runs, {len(raw)} measurements in {time.perf_counter() - tic:.0f} s "
              f"({args.workers} workers)")

    slopes = slope_table(raw)
    slopes.to_csv(os.path.join(args.out, "slopes.csv"), index=False)
    with open(os.path.join(args.out, "slopes.md"), "w") as fh:
        fh.write(markdown(slopes))
    draw(raw, slopes, "subopt", os.path.join(args.out, "convergence.png"))
    draw(raw, slopes, "gap", os.path.join(args.out, "duality_gap.png"))
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(slopes.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
