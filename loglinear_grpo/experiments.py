"""Scenario sweeps of the synthetic experiments (paper §5.1, Figures 2–4).

:func:`run_sweep` runs every (scenario, method, seed) in parallel processes and returns a tidy
DataFrame with columns ``scenario, method, loss, seed, step, metric, value``; saved results
carry their exact settings in a JSON file beside them, so figures can be redrawn without
rerunning.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .objective import _group_losses
from .algorithm1 import averaged_theta
from .solver import solve
from .synthetic import SCENARIOS, scenario_data

#: the six methods of Figures 2–4: (loss, method, estimator)
METHODS = {
    "DPO": ("dpo", "vanilla", "full"),
    "IS-DPO": ("dpo", "importance_sampling", "full"),
    "GR-DPO": ("dpo", "group_robust", "full"),
    "IPO": ("ipo", "vanilla", "closed_form"),
    "IS-IPO": ("ipo", "importance_sampling", "closed_form"),
    "GR-IPO": ("ipo", "group_robust", "closed_form"),
}


@dataclass(frozen=True)
class ScenarioSettings:
    """Hyper-parameters of one scenario (defaults: the authors' runs, see :data:`PAPER_SETTINGS`)."""

    steps: int
    step_size: float
    alpha_step_size: float
    beta_dpo: float = 1.0
    beta_ipo: float = 0.1
    alpha_step_size_ipo: float = 0.01


#: the authors' settings (the "paper" preset): full-batch θ step / α step / β for DPO; IPO uses
#: β = 0.1 and the closed-form θ step. The paper gives no α step for GR-IPO; its losses are ~20× DPO's,
#: and with η_α = 0.5 Hedge jumps between vertices (the best response then overfits one group);
#: η_α = 0.01 is used. Every run of this preset takes all its steps and reports its certified gap
#: on the training objective beside the certified optimum of the default solver.
PAPER_SETTINGS = {
    "imbalanced_both": ScenarioSettings(steps=20000, step_size=0.9, alpha_step_size=0.5),
    "imbalanced_sizes": ScenarioSettings(steps=20000, step_size=0.5, alpha_step_size=0.9),
    "imbalanced_difficulty": ScenarioSettings(steps=10000, step_size=5.0, alpha_step_size=0.01,
                                              beta_dpo=2.0),
}


def run_one(scenario, method, seed, settings, n_train=300, n_val=300, feature_map="swapped",
            n_evals=50, iterate="average"):
    """One training run with the preset's fixed steps (all of them), then the certified optimum of the
    same training objective; returns tidy rows.

    Metrics over the iterations: ``worst_val_loss``, ``max_reward_error``, ``worst_train_loss``,
    ``val_loss/<g>``, ``reward_error/<g>``, ``alpha/<g>`` (``iterate="average"`` evaluates the averaged
    iterate θ̄_t, the output of Proposition 3; ``"last"`` evaluates θ⁽ᵗ⁾). At the last step also
    ``train_objective`` and ``train_gap`` (the preset run's certified duality gap on its training
    objective) and ``certified/…`` for the default solver's certified optimum: ``train_objective``,
    ``train_gap``, ``converged``, ``worst_val_loss``, ``max_reward_error``.
    """
    loss, how, estimator = METHODS[method]
    beta = settings.beta_dpo if loss == "dpo" else settings.beta_ipo
    bandit, train, val = scenario_data(scenario, n=n_train, n_val=n_val, seed=seed,
                                       feature_map=feature_map)
    every = max(1, settings.steps // n_evals)
    rows = []
    names = list(train.data.group_names)

    def evaluate(theta, alpha, step):
        val_losses = _group_losses(theta, val.data, loss, beta)
        errors = bandit.reward_errors(theta, val.states, val.groups)
        values = {"worst_val_loss": val_losses.max(), "max_reward_error": errors.max(),
                  "worst_train_loss": _group_losses(theta, train.data, loss, beta).max()}
        for g, name in enumerate(names):
            values[f"val_loss/{name}"] = val_losses[g]
            values[f"reward_error/{name}"] = errors[g]
            values[f"alpha/{name}"] = alpha[g]
        rows.extend({"scenario": scenario, "method": method, "loss": loss, "seed": seed,
                     "step": step, "metric": k, "value": float(v)} for k, v in values.items())

    def callback(state, info):
        if state.step % every == 0 or state.step == settings.steps:
            theta = state.theta if iterate == "last" else averaged_theta(state)
            evaluate(theta, np.exp(state.log_alpha), state.step)

    step_size = None if estimator == "closed_form" else settings.step_size
    alpha_step = 0.0
    if how == "group_robust":
        alpha_step = settings.alpha_step_size if loss == "dpo" else settings.alpha_step_size_ipo
    evaluate(np.zeros(train.data.dim), np.full(len(names), 1.0 / len(names)), 0)
    # the authors' preset: fixed steps, all of them (tol=None); the result still carries its certificate
    run = solve(train.data, loss=loss, beta=beta, method=how, estimator=estimator, steps=settings.steps,
                step_size=step_size, alpha_step_size=alpha_step, log_every=settings.steps, tol=None,
                callback=callback)
    # beside it, the certified optimum of the same training objective (the default solver)
    best = solve(train.data, loss=loss, beta=beta, method=how)
    final = {"train_objective": run.value, "train_gap": run.gap,
             "certified/train_objective": best.value, "certified/train_gap": best.gap,
             "certified/converged": float(best.converged),
             "certified/worst_val_loss": _group_losses(best.theta, val.data, loss, beta).max(),
             "certified/max_reward_error": bandit.reward_errors(best.theta, val.states, val.groups).max()}
    rows.extend({"scenario": scenario, "method": method, "loss": loss, "seed": seed, "step": settings.steps,
                 "metric": k, "value": float(v)} for k, v in final.items())
    return rows


def _run_task(args):
    return run_one(*args[:4], **args[4])


def run_sweep(scenarios=tuple(SCENARIOS), methods=tuple(METHODS), seeds=20, settings=None,
              n_jobs=None, progress=True, out=None, steps=None, **run_kwargs):
    """Run methods × scenarios × seeds and return the tidy results.

    Parameters
    ----------
    scenarios, methods : sequences of names (:data:`~loglinear_grpo.synthetic.SCENARIOS`,
        :data:`METHODS`).
    seeds : int or sequence of int
    settings : dict scenario -> ScenarioSettings, optional
        Default :data:`PAPER_SETTINGS`.
    n_jobs : int, optional
        Worker processes (default: all cores).
    steps : int, optional
        Override every scenario's number of iterations (short runs).
    out : path, optional
        Write ``<out>.csv`` and the settings to ``<out>.json``.
    **run_kwargs
        ``n_train``, ``n_val``, ``feature_map``, ``n_evals``, ``iterate`` (see :func:`run_one`).

    Returns
    -------
    pandas.DataFrame
        Columns ``scenario, method, loss, seed, step, metric, value``; ``.attrs["wall_time_s"]``
        holds the wall time.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"scenarios: unknown {sorted(unknown)}; choose from {list(SCENARIOS)}")
    seeds = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed (a positive count or a non-empty list)")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    settings = dict(PAPER_SETTINGS if settings is None else settings)
    if steps is not None:
        settings = {k: ScenarioSettings(**{**asdict(v), "steps": int(steps)}) for k, v in settings.items()}
    tasks = [(sc, m, s, settings[sc], run_kwargs) for sc in scenarios for m in methods for s in seeds]
    n_jobs = n_jobs or os.cpu_count() or 1
    start = time.perf_counter()
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), desc="runs", unit="run")
    if n_jobs == 1:
        for task in tasks:
            rows.extend(_run_task(task))
            if bar is not None:
                bar.update()
    else:
        with ProcessPoolExecutor(max_workers=n_jobs) as pool:
            for fut in as_completed([pool.submit(_run_task, t) for t in tasks]):
                rows.extend(fut.result())
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    df = pd.DataFrame(rows).sort_values(["scenario", "method", "seed", "step", "metric"],
                                        kind="stable").reset_index(drop=True)
    meta = {"scenarios": list(scenarios), "methods": list(methods), "seeds": seeds,
            "settings": {k: asdict(v) for k, v in settings.items() if k in scenarios},
            "run_kwargs": run_kwargs, "n_jobs": n_jobs, "wall_time_s": wall}
    df.attrs.update(meta)
    if out is not None:
        out = os.fspath(out)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        df.to_csv(out + ".csv", index=False)
        with open(out + ".json", "w") as fh:
            json.dump(meta, fh, indent=2)
    return df


FINAL_METRICS = ("worst_val_loss", "max_reward_error", "train_gap", "certified/worst_val_loss",
                 "certified/max_reward_error", "certified/train_gap")


def final_table(df, metrics=FINAL_METRICS):
    """Mean ± standard error over seeds of each metric at the last step, per scenario and method."""
    last = df[df["step"] == df.groupby(["scenario", "method"])["step"].transform("max")]
    last = last[last["metric"].isin(metrics)]
    agg = last.groupby(["scenario", "method", "metric"])["value"].agg(["mean", "std", "count"])
    agg["se"] = agg["std"] / np.sqrt(agg["count"])
    return agg[["mean", "se", "count"]].reset_index()


def load_sweep(path):
    """Read results written by :func:`run_sweep` (``path`` without extension)."""
    df = pd.read_csv(os.fspath(path) + ".csv")
    with open(os.fspath(path) + ".json") as fh:
        df.attrs.update(json.load(fh))
    return df
