"""Figures: curves of a sweep with mean ± standard error over seeds (paper Figures 2–4)."""
from __future__ import annotations

import numpy as np

COLORS = {"DPO": "tab:blue", "IS-DPO": "tab:orange", "GR-DPO": "tab:green",
          "IPO": "tab:blue", "IS-IPO": "tab:orange", "GR-IPO": "tab:green"}
TITLES = {"worst_val_loss": "worst-group validation loss", "max_reward_error": "max reward error"}


def plot_scenario(df, scenario, path=None, title=None):
    """One figure per scenario: worst-group validation loss and max reward error against the
    iteration, for the DPO family and the IPO family, each method's mean ± s.e. over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[df["scenario"] == scenario]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = [("dpo", "worst_val_loss"), ("dpo", "max_reward_error"),
              ("ipo", "worst_val_loss"), ("ipo", "max_reward_error")]
    for ax, (loss, metric) in zip(axes, panels):
        part = sub[(sub["loss"] == loss) & (sub["metric"] == metric)]
        for method, rows in part.groupby("method", sort=False):
            stats = rows.groupby("step")["value"].agg(["mean", "std", "count"])
            se = stats["std"].fillna(0) / np.sqrt(stats["count"])
            ax.plot(stats.index, stats["mean"], label=method, color=COLORS.get(method))
            ax.fill_between(stats.index, stats["mean"] - se, stats["mean"] + se, alpha=0.25,
                            color=COLORS.get(method))
        ax.set_title(f"{loss.upper()}: {TITLES[metric]}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = sub["seed"].nunique()
    fig.suptitle(title or f"{scenario} (mean ± s.e. over {n_seeds} seeds)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
        plt.close(fig)
    return fig
