"""Figures: curves of a sweep with mean ± standard error over seeds (paper Figures 2–4)."""
from __future__ import annotations

import numpy as np

from .experiments import METHODS
from .synthetic import SCENARIO_FIGURES, SCENARIO_LABELS

COLORS = {"DPO": "tab:blue", "IS-DPO": "tab:orange", "GR-DPO": "tab:green",
          "IPO": "tab:blue", "IS-IPO": "tab:orange", "GR-IPO": "tab:green"}
TITLES = {"worst_val_loss": "worst-group validation loss", "max_reward_error": "max reward error"}


def plot_scenario(df, scenario, path=None, title=None):
    """One figure per scenario: worst-group validation loss and max reward error against the
    iteration, for the DPO family and the IPO family, each method's mean ± s.e. over seeds (solid,
    the preset's fixed-step run) and the value at the certified optimum of the same training
    objective (dashed, when the sweep has it). Every panel lists the methods in the same order:
    vanilla, importance sampling, group robust."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[df["scenario"] == scenario]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [("dpo", "worst_val_loss"), ("dpo", "max_reward_error"),
              ("ipo", "worst_val_loss"), ("ipo", "max_reward_error")]
    for ax, (loss, metric) in zip(axes, panels):
        for method in [m for m, spec in METHODS.items() if spec[0] == loss]:
            rows = sub[(sub["method"] == method) & (sub["metric"] == metric)]
            if rows.empty:
                continue
            stats = rows.groupby("step")["value"].agg(["mean", "std", "count"])
            se = stats["std"].fillna(0) / np.sqrt(stats["count"])
            ax.plot(stats.index, stats["mean"], label=method, color=COLORS.get(method))
            ax.fill_between(stats.index, stats["mean"] - se, stats["mean"] + se, alpha=0.25,
                            color=COLORS.get(method))
            optimum = sub[(sub["method"] == method) & (sub["metric"] == f"certified/{metric}")]["value"]
            if not optimum.empty:
                ax.axhline(optimum.mean(), color=COLORS.get(method), linestyle="--", linewidth=1,
                           label=f"{method} at its certified optimum")
        ax.set_title(f"{loss.upper()}: {TITLES[metric]}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n_seeds = sub["seed"].nunique()
    default = (f"{SCENARIO_FIGURES.get(scenario, '')} — scenario {SCENARIO_LABELS.get(scenario, scenario)} "
               f"(mean ± s.e. over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
               f"{'; one seed: no s.e.' if n_seeds == 1 else ''})")
    fig.suptitle(title or default)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
        plt.close(fig)
    return fig
