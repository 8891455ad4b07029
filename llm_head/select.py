"""Choosing the radius R and the group adjustment C of a head on the validation split.

:func:`select_head` solves the head at every point of a grid of radii R (Θ = ball(θ_ref, R)) and
adjustments C (:func:`loglinear_grpo.solve_path`, every point certified), scores every solution on
the validation pairs with one of :data:`CRITERIA`, and keeps the best. R = 0 — the reference head,
θ = θ_ref, the frozen model — is always a candidate, so a selection can answer "no trained head beats
the frozen model on validation data".
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import loglinear_grpo as lg

from .train import evaluate, worst_group_name

#: the default grid of radii R (0 is the reference head; it is always added)
DEFAULT_RADII = (0, 0.1, 0.3, 1, 3, 10)
#: the default grid of group adjustments C (group g's loss counts as L_g + C/√N_g)
DEFAULT_ADJUSTMENTS = (0, 0.5, 1, 2, 4)
#: two points whose scores differ by at most this (relative) are tied: the smaller R, then C, wins
TIE_RTOL = 1e-12
#: the methods whose minimiser C does not change (fixed group weights: C/√N_g only adds a constant)
C_FREE_METHODS = ("vanilla", "importance_sampling")


@dataclass(frozen=True)
class Criterion:
    """How a validation table (:func:`llm_head.train.evaluate`) is scored: ``table.loc[("aggregate",
    row), column]``, lower or higher is better."""

    row: str
    column: str
    higher_is_better: bool
    words: str

    def score(self, table):
        """The score of one validation table."""
        return float(table.loc[("aggregate", self.row), self.column])


#: the selection criteria, by name
CRITERIA = {
    "worst-loss": Criterion("worst", "loss", False, "worst-group loss"),
    "min-accuracy": Criterion("extreme", "rewards/accuracies", True, "min-group rewards/accuracies"),
}


@dataclass
class Selection:
    """What :func:`select_head` returns.

    Attributes
    ----------
    path : loglinear_grpo.PathResult
        Every solve of the grid (its ``table`` and ``results``).
    scores : pandas.DataFrame
        One row per grid point, sorted by ``radius`` then ``adjustment``: ``radius``, ``adjustment``,
        the training objective's ``value``, ``gap`` and ``converged``; on the validation split ``score``
        (the criterion's), ``val_worst_group`` and ``val_worst_loss`` (the worst validation group — or
        ``"tie: k groups"`` when k groups share the largest loss, as at R = 0 — and its loss), ``val_min_accuracy`` (min-group rewards/accuracies) and ``val_mean_loss`` (mean loss
        over pairs); ``chosen`` (True on one row).
    radius, adjustment : float
        The chosen R and C.
    result : loglinear_grpo.SolveResult or loglinear_grpo.ReferencePoint
        The chosen solution (a ``ReferencePoint``, θ = θ_ref, when R = 0 is chosen).
    criterion : str
        The key of :data:`CRITERIA` used.
    notes : list of str
        What a user should know about the choice (edge of the grid, the reference wins, C ignored).
    method, loss, beta : str, str, float
        The head's settings.
    validation : pandas.DataFrame
        The chosen head's validation table (:func:`~llm_head.train.evaluate`).
    """

    path: lg.PathResult = field(repr=False)
    scores: pd.DataFrame = field(repr=False)
    radius: float
    adjustment: float
    result: object = field(repr=False)
    criterion: str
    notes: list
    method: str = "group_robust"
    loss: str = "dpo"
    beta: float = 0.1
    validation: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def theta(self):
        """The chosen head's θ."""
        return self.result.theta


def check_criterion(criterion):
    """The :class:`Criterion` of a name of :data:`CRITERIA` (a ``ValueError`` naming the choices)."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    return CRITERIA[criterion]


def check_grid(name, values):
    """A grid of R or C as a sorted list of distinct floats ≥ 0.

    Raises
    ------
    ValueError
        Empty, or a value that is not a finite number ≥ 0 (the message names ``name``).
    """
    if values is None:
        raise ValueError(f"{name}: the grid is empty; give at least one value")
    if np.ndim(values) == 0:
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{name}: the grid is empty; give at least one value")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} must be finite numbers >= 0, got {v!r}")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be finite numbers >= 0, got {v!r}") from None
        if not np.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be finite numbers >= 0, got {v!r}")
        out.append(x)
    return sorted(set(out))


def extended_grid(grid):
    """``grid`` with 3× and 10× its largest value appended (what to try when a choice is at its edge)."""
    top = max(grid)
    return sorted(set(grid) | {3.0 * top, 10.0 * top})


def _format_grid(grid):
    return " ".join(f"{v:g}" for v in grid)


def choose(scores, criterion):
    """The index (label) of the best row of ``scores`` by the ``score`` column: the lowest (or, for a
    higher-is-better criterion, highest) score; scores within :data:`TIE_RTOL` (relative) of the best
    are tied, and of those the smallest ``radius``, then the smallest ``adjustment`` wins. A non-finite
    score is never chosen.

    Raises
    ------
    ValueError
        No row has a finite score.
    """
    crit = check_criterion(criterion)
    score = scores["score"].to_numpy(dtype=np.float64)
    finite = np.isfinite(score)
    if not finite.any():
        raise ValueError("no grid point has a finite validation score")
    signed = np.where(finite, -score if crit.higher_is_better else score, np.inf)
    best = signed.min()
    tied = signed <= best + TIE_RTOL * max(abs(best), np.finfo(float).tiny)
    candidates = scores[tied]
    order = np.lexsort((candidates["adjustment"].to_numpy(), candidates["radius"].to_numpy()))
    return candidates.index[order[0]]


def selection_notes(scores, radius, adjustment, criterion, *, radii=None, adjustments=None):
    """The notes of a choice (R, C) on a grid.

    Parameters
    ----------
    scores : pandas.DataFrame
        With ``radius`` and ``adjustment`` columns (the grid).
    radius, adjustment : float
        The choice.
    criterion : str
    radii, adjustments : sequence of float, optional
        The grids (default: the values in ``scores``).

    Returns
    -------
    list of str
        * R = 0 chosen: "no trained head beats the reference (frozen model) on the <criterion> of the
          validation split";
        * the choice at the largest R or C of its grid (that value > 0): at the edge, and the extended
          grid to try (3× and 10× the largest value appended).
    """
    crit = check_criterion(criterion)
    radii = sorted(set(scores["radius"])) if radii is None else list(radii)
    adjustments = sorted(set(scores["adjustment"])) if adjustments is None else list(adjustments)
    notes = []
    if radius == 0:
        notes.append(f"no trained head beats the reference (frozen model) on the {crit.words} of the "
                     "validation split (R = 0 chosen)")
    if radius > 0 and radius == max(radii):
        notes.append(f"the chosen R = {radius:g} is at the edge of the grid (its largest radius): a larger R "
                     f"may be better; try --radii {_format_grid(extended_grid(radii))}")
    if adjustment > 0 and adjustment == max(adjustments) and radius > 0:
        notes.append(f"the chosen C = {adjustment:g} is at the edge of the grid (its largest adjustment): a "
                     f"larger C may be better; try --adjustments {_format_grid(extended_grid(adjustments))}")
    return notes


def score_table(problem, theta, loss, beta, split="val"):
    """:func:`~llm_head.train.evaluate` of θ on ``split``, its warnings (groups absent from the split)
    silenced: the table's NaN rows say so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(problem, theta, loss, beta, split)


def select_head(problem, *, loss="dpo", method="group_robust", radii=DEFAULT_RADII, adjustments=DEFAULT_ADJUSTMENTS,
                criterion="worst-loss", beta=0.1, tol=1e-6, progress=False, **solve_kw):
    """Solve the head on a grid of R × C (train split) and choose the point that scores best on the
    validation split.

    Parameters
    ----------
    problem : llm_head.HeadProblem
    loss : str
        ``"dpo"``/``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
    method : str
        ``"group_robust"``, ``"vanilla"`` or ``"importance_sampling"``. For the last two C does not
        change the minimiser, so the C grid collapses to [0] (with a note).
    radii : sequence of float ≥ 0
        The radii R of Θ = ball(θ_ref, R); R = 0 (the reference head, θ = θ_ref) is added if missing.
    adjustments : sequence of float ≥ 0
        The group adjustments C.
    criterion : str
        A key of :data:`CRITERIA`: ``"worst-loss"`` (the worst validation group's loss, lower is
        better) or ``"min-accuracy"`` (the min-group validation ``rewards/accuracies``, higher is
        better).
    beta : float
        β of the loss.
    tol : float or None
        Relative certified duality gap of every solve (None or 0: the solver's own stopping rule).
    progress : bool
        Print one line per solve and the notes.
    **solve_kw
        Other options of :func:`loglinear_grpo.solve` (``estimator``, ``steps``, ``chi``, ``seed``, ...),
        the same at every point.

    Returns
    -------
    Selection

    Raises
    ------
    ValueError
        An empty grid, a negative or non-finite R or C, an unknown criterion, or a bad solver setting
        (checked before anything is solved); no point with a finite validation score.
    """
    crit = check_criterion(criterion)
    radii = check_grid("radii", radii)
    adjustments = check_grid("adjustments", adjustments)
    notes = []
    if 0.0 not in radii:
        radii = [0.0] + radii
    if method in C_FREE_METHODS and adjustments != [0.0]:
        notes.append(f"{method}: the group adjustment C does not change its minimiser (its group weights are "
                     f"fixed, so C/sqrt(N_g) only adds a constant): the C grid {_format_grid(adjustments)} "
                     "collapsed to [0]")
        adjustments = [0.0]
    if tol is not None and tol <= 0:
        tol = None
    val = problem.data("val")                                   # a missing val split: an error before solving
    if progress:
        solves = sum(r > 0 for r in radii) * len(adjustments)
        print(f"select ({method}, {loss}): {solves} certified solve(s) on the train split, R in "
              f"[{_format_grid(radii)}] x C in [{_format_grid(adjustments)}]; each scored on {val.n_samples} "
              f"validation pairs ({crit.words})", flush=True)
    path = lg.solve_path(problem.data("train"), radii, adjustments, center=problem.theta_ref, loss=loss,
                         beta=beta, method=method, tol=tol, progress=progress, **solve_kw)
    rows, tables = [], []
    for result in path.results:
        table = score_table(problem, result.theta, loss, beta, "val")
        tables.append(table)
        worst = table.loc[("aggregate", "worst")]
        rows.append({"score": crit.score(table), "val_worst_group": worst_group_name(table),
                     "val_worst_loss": float(worst["loss"]),
                     "val_min_accuracy": float(table.loc[("aggregate", "extreme"), "rewards/accuracies"]),
                     "val_mean_loss": float(table.loc[("aggregate", "mean over pairs"), "loss"])})
    scores = pd.concat([path.table[["radius", "adjustment", "value", "gap", "converged"]].reset_index(drop=True),
                        pd.DataFrame(rows)], axis=1)
    best = choose(scores, criterion)
    scores["chosen"] = scores.index == best
    radius, adjustment = float(scores.loc[best, "radius"]), float(scores.loc[best, "adjustment"])
    notes += selection_notes(scores, radius, adjustment, criterion, radii=radii, adjustments=adjustments)
    order = scores.sort_values(["radius", "adjustment"], kind="stable").index
    selection = Selection(path=path, scores=scores.loc[order].reset_index(drop=True), radius=radius,
                          adjustment=adjustment, result=path.results[best], criterion=criterion, notes=notes,
                          method=method, loss=loss, beta=beta, validation=tables[best])
    if progress:
        shown = selection.scores.assign(chosen=selection.scores["chosen"].map({True: "<-", False: ""}))
        print(f"validation scores ({crit.words}; value, gap: the training objective and its certificate):")
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.6g}"), flush=True)
        print(describe_choice(selection), flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    return selection


def describe_choice(selection):
    """One line: the chosen R (and C), its validation score, and the reference's."""
    crit = CRITERIA[selection.criterion]
    s = selection.scores
    chosen = s[s["chosen"]].iloc[0]
    reference = s[s["radius"] == 0].iloc[0]
    what = "the reference head (R = 0, θ = θ_ref)" if selection.radius == 0 else (
        f"R = {selection.radius:g}" + (f", C = {selection.adjustment:g}" if selection.method not in C_FREE_METHODS
                                       else ""))
    return (f"chosen ({selection.method}, by the validation {crit.words}, "
            f"{'higher' if crit.higher_is_better else 'lower'} is better): {what}: {chosen['score']:.6g} "
            f"(reference {reference['score']:.6g}; worst validation group {chosen['val_worst_group']})")


def plot_selection(selection, path, title=""):
    """``selection.png``: the validation score against R, one line per C, on a log R axis with R = 0
    (the reference head) drawn apart at the left and labelled "reference"; the chosen point marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    crit = CRITERIA[selection.criterion]
    s = selection.scores
    positive = np.sort(s.loc[s["radius"] > 0, "radius"].unique())
    log = np.log10(positive)
    step = float(np.diff(log).min()) if log.size > 1 else 1.0
    ref_x = (log[0] if log.size else 0.0) - max(1.0, 1.5 * step)

    def position(r):
        r = np.asarray(r, dtype=float)
        return np.where(r > 0, np.log10(np.where(r > 0, r, 1.0)), ref_x)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    reference = s[s["radius"] == 0]
    ref_score = float(reference["score"].iloc[0])
    for k, c_value in enumerate(sorted(s["adjustment"].unique())):
        part = s[(s["adjustment"] == c_value) & (s["radius"] > 0)].sort_values("radius")
        label = f"C = {c_value:g}" if selection.method not in C_FREE_METHODS else selection.method
        ax.plot(position(part["radius"]), part["score"], "o-", color=f"C{k}", label=label, markersize=4)
        if len(part):                                # a dotted link from the reference to the first radius
            ax.plot([ref_x, position(part["radius"].iloc[0])], [ref_score, part["score"].iloc[0]], ":",
                    color=f"C{k}", linewidth=0.8)
    ax.plot([ref_x], [ref_score], "s", color="k", markersize=7, label="reference (R = 0, frozen model)")
    chosen = s[s["chosen"]].iloc[0]
    ax.plot(position([chosen["radius"]]), [chosen["score"]], "*", color="red", markersize=16, zorder=5,
            label=f"chosen: R = {chosen['radius']:g}" + (f", C = {chosen['adjustment']:g}"
                                                          if selection.method not in C_FREE_METHODS else ""))
    if log.size:
        ax.axvline(0.5 * (ref_x + log[0]), color="0.7", linewidth=0.8, linestyle="--")
    ax.set_xticks([ref_x, *log], ["reference", *(f"{r:g}" for r in positive)])
    ax.set_xlabel("radius R of Θ = ball(θ_ref, R) (log scale; R = 0 apart)")
    ax.set_ylabel(f"validation {crit.words} ({'higher' if crit.higher_is_better else 'lower'} is better)")
    ax.legend(fontsize=7)
    ax.set_title(title or f"{selection.method}: choosing R and C on the validation split", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
