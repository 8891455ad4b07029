"""What the figures of :mod:`llm_head` share: the group axis, with overlapping groups marked by grouping."""
from __future__ import annotations

import textwrap

import numpy as np


def wrapped(name, width=14):
    """A tick label wrapped at ``width`` characters (at spaces where it can)."""
    return "\n".join(textwrap.wrap(str(name), width)) or str(name)


def groupings_of(table):
    """The grouping of every group row of an :func:`llm_head.train.evaluate` table (its ``grouping``
    column: the union of several groupings), or None (plain labels)."""
    if "grouping" not in table.columns:
        return None
    return [str(g) for g in table.loc["group"]["grouping"]]


def group_axis(ax, names, groupings=None, rotate=False, fontsize=7):
    """Label the x axis of a per-group panel (groups at 0, 1, …). With ``groupings`` (one per name: the
    union of several groupings, names ``"<grouping>=<value>"``) each tick shows the value, a line
    separates the groupings and each grouping's name is written over its groups."""
    names = [str(n) for n in names]
    x = np.arange(len(names))
    labels = names
    if groupings is not None:
        labels = [n[len(g) + 1:] if n.startswith(g + "=") else n for n, g in zip(names, groupings)]
    ax.set_xticks(x, [wrapped(n) for n in labels], fontsize=fontsize, rotation=45 if rotate else 0,
                  ha="right" if rotate else "center", rotation_mode="anchor" if rotate else "default")
    if groupings is None:
        return
    low, high = ax.get_ylim()                         # head room for the groupings' names
    ax.set_ylim(low, high + 0.12 * (high - low))
    from matplotlib.transforms import blended_transform_factory
    where = blended_transform_factory(ax.transData, ax.transAxes)
    start = 0
    for stop in range(1, len(names) + 1):
        if stop == len(names) or groupings[stop] != groupings[start]:
            if stop < len(names):
                ax.axvline(stop - 0.5, color="0.35", linewidth=1.0, linestyle="--")
            ax.text((start + stop - 1) / 2, 0.98, groupings[start], transform=where, ha="center", va="top",
                    fontsize=fontsize + 1, fontweight="bold", color="0.25",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=1))
            start = stop
