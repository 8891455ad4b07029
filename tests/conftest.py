import os
import pathlib

import numpy as np
import pytest

import loglinear_grpo as lg

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("GRPO_SHARED", ROOT.parent / "shared"))
GLOBAL_OPINIONS = SHARED / "data" / "global_opinions_partial.csv"


def make_problem(sizes=(30, 80, 200), dim=5, seed=0, shift=0.3, noise=2.0):
    """Groups of unequal size whose preferences disagree: a true minimax trade-off."""
    rng = np.random.default_rng(seed)
    rows, groups = [], []
    for g, n in enumerate(sizes):
        w = rng.normal(size=dim)
        s = rng.normal(size=(n, dim)) + shift * g
        keep = rng.random(n) < 1.0 / (1.0 + np.exp(-noise * (s @ w)))
        s[~keep] *= -1.0
        rows.append(s)
        groups.append(np.full(n, g))
    return lg.PreferenceData(np.vstack(rows), np.concatenate(groups),
                             group_names=[f"g{g}" for g in range(len(sizes))])


@pytest.fixture(scope="session")
def problem():
    return make_problem()
