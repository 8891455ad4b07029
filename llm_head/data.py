"""Grouped preference pairs from anyone's data: TRL's preference formats, files, ``datasets`` objects, the hub.

One table is the unit everything else works on (:class:`PreferencePairs`): a row per pair with
``prompt``, ``chosen``, ``rejected`` and ``group`` (the group's name), optionally ``split`` and any
other columns (kept as they are). It is read from

* TRL's *standard* format — ``prompt``, ``chosen``, ``rejected`` strings — or its *conversational*
  format — the same columns as lists of ``{"role", "content"}`` messages (TRL's
  ``is_conversational``);
* a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a ``datasets.Dataset`` or
  ``DatasetDict`` (its split names become the ``split`` column), or a hub id, read with
  ``datasets.load_dataset``;
* GlobalOpinionQA's own table (``question, selections, options``): recognised by its columns and
  turned into pairs by :mod:`llm_head.opinions` (one adapter onto the same table).

Cells are read as the file has them, never re-typed: a CSV is read as text (``dtype=str``, no
default NA strings, so the group ``NA`` and the answers ``None``, ``N/A``, ``" 3"`` or ``1`` are
text), JSON and JSON Lines with the :mod:`json` module (a JSON string stays that string, ``"01"``
and ``"1"`` stay two labels), parquet and ``datasets`` objects with their own types. A cell means
"missing" only when the file says so (JSON ``null``, an absent key, an empty CSV cell reads as
empty text) or the caller asks for it (``na_values=``). A UTF-8 byte-order mark at the start of a
file is ignored (``utf-8-sig``).

Bad rows — a missing, empty or non-string text, chosen == rejected, a missing or empty group, a
JSON Lines line that is not a JSON object — are counted, reported (``skipped``, with the reason; a
malformed line by its 1-based ``line`` number) and left out; ``strict=True`` refuses a malformed
line instead, naming it. A file that is neither format gives one ``ValueError`` naming the file
and the columns it has; an empty file is refused as empty.

Group labels: a string label is the group's name as it is; a number is named by its decimal form
(``3`` and ``3.0`` → ``"3"``, one JSON type). Labels of different types that would read as one
name (the number ``1`` and the string ``"1"``, the boolean ``true`` and the string ``"True"``) are
refused with a ``ValueError`` naming the column and showing them, never merged silently.

Splits: a ``split`` column (``train`` / ``val`` / ``test``; ``validation``, ``dev`` and ``eval`` are
read as ``val``) is used as given; otherwise :func:`assign_splits` draws a seeded split *by prompt*
(or by any column, e.g. ``question_id``), so that no prompt is in two splits.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .opinions import PAPER_COUNTRIES, load_global_opinions, opinion_pairs
from .tables import FILE_READERS, PreferencePairs, _plain, prompt_key, read_table  # noqa: F401 (re-exported)

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "eval": "val", "test": "test", "testing": "test"}


def _is_messages(value):
    value = _plain(value)
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _text_problem(value, conversational):
    """Why this prompt/answer cell is unusable, or None."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "missing text"
    if conversational:
        if not _is_messages(value):
            return "not a list of {role, content} messages"
        if any(not isinstance(m["content"], str) or not m["content"].strip() for m in _plain(value)):
            return "empty message"
        return None
    if not isinstance(value, str):
        return f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return "empty text"
    return None


# ============================================================================ reading (the readers: llm_head.tables)
def detect_format(frame, name="data"):
    """``"global_opinions"`` or ``"pairs"``; a ``ValueError`` naming the columns found otherwise."""
    cols = set(frame.columns)
    if not cols:
        raise ValueError(f"{name} is empty: no rows and no columns (expected preference pairs: prompt, chosen, "
                         "rejected and a group column)")
    if {"question", "selections", "options"} <= cols:
        return "global_opinions"
    if {"chosen", "rejected"} <= cols:
        return "pairs"
    hint = ""
    if len(cols) == 1:                   # one column whose name holds a delimiter: a CSV read with the wrong one
        (only,) = map(str, cols)
        found = [d for d in (";", "\t", "|", ",") if d in only]
        if found:
            hint = (f" (one column named {only!r}: the file looks {found[0]!r}-separated; save it as a "
                    "comma-separated CSV, or read it with pandas.read_csv(sep=...) and pass the frame)")
    raise ValueError(f"{name}: neither preference pairs (needs columns prompt, chosen, rejected and a group "
                     f"column) nor a GlobalOpinionQA table (question, selections, options); found columns "
                     f"{sorted(map(str, cols))}{hint}")


# ============================================================================ pairs
def _group_columns(group_column):
    """The group column(s) as a list: one column (any name, as before), or several groupings (distinct
    string names without ``=``, which joins a grouping to its values, and not ``split``)."""
    columns = list(group_column) if isinstance(group_column, (list, tuple)) else [group_column]
    if not columns:
        raise ValueError("group_column: give a column name, or a list of them")
    if len(columns) > 1:
        if not all(isinstance(c, str) and c for c in columns):
            raise ValueError(f"group columns: several groupings are named by strings, got {columns!r}")
        if len(set(columns)) < len(columns):
            raise ValueError(f"group columns named twice: {columns}")
        bad = [c for c in columns if "=" in c or c == "split"]
        if bad:
            raise ValueError(f"group columns {bad}: a grouping's name may not hold '=' (its groups are named "
                             "'column=value') nor be the split column; rename the column")
    return columns


def pairs_from_frame(frame, *, group_column="group", name="data", groups=None, intersect=False, min_group_size=1,
                     small_groups="keep", limit=None):
    """Validate and clean a frame of preference pairs into :class:`PreferencePairs`.

    Parameters
    ----------
    frame : DataFrame
        TRL's standard or conversational preference format plus a group column (or several).
    group_column : str or list of str
        The column holding each pair's group: strings (the group's name, as it is), or numbers
        (named by their decimal form, ``3`` → ``"3"``). A label that is missing (``None``, NaN,
        absent) or an empty string is a bad row (reason ``missing group`` / ``empty group``); labels
        of different types that read as one name (``1`` and ``"1"``) raise ``ValueError``. Several
        columns (``["country", "age_band"]``) are several groupings: by default their **union** — a
        group ``"country=Kenya"`` for every value of every grouping, each pair in one group of each
        grouping, so that the worst-off country *and* the worst-off age band are served (the
        objective :math:`\\max_g L_g` over all of them, overlapping groups:
        :class:`loglinear_grpo.PreferenceData`); with ``intersect=True`` the cells of their cross
        product (``"country=Kenya & age_band=18-24"``, plain labels).
    groups : sequence of str, optional
        Keep only these groups, in this order (default: all, in order of first appearance). One
        group column only.
    intersect : bool
        Several group columns: their cross product's cells instead of their union.
    min_group_size, small_groups
        The intersection's cells with fewer than ``min_group_size`` pairs are reported
        (``small_cells``) and, by ``small_groups``, kept (``"keep"``), merged into one cell
        (``"merge"``) or dropped (``"drop"``: their pairs are listed in ``skipped``, reason ``small
        cell``); :func:`loglinear_grpo.intersect_groupings`.
    limit : int, optional
        Keep the first ``limit`` pairs of each group (of each cell, before small cells are merged or
        dropped; with the union, a pair stays when it is among the first ``limit`` of one of its
        groups, so every group keeps at least ``limit`` pairs, or all it has).

    Raises
    ------
    ValueError
        A missing column; labels of different types that read as one group; no usable pair;
        ``groups`` with several group columns; ``intersect`` with one.
    """
    columns = _group_columns(group_column)
    several = len(columns) > 1
    if intersect and not several:
        raise ValueError("intersect: give at least two group columns to intersect (e.g. --group-columns country "
                         "age_band --intersect)")
    if several and groups is not None:
        raise ValueError(f"groups= (--groups) keeps groups of one group column; with several ({columns}) select the "
                         "rows of the data first")
    if (min_group_size != 1 or small_groups != "keep") and not intersect:
        raise ValueError("min_group_size / small_groups (--min-group-size / --small-groups) apply to an "
                         "intersection of groupings (--intersect)")
    missing = [c for c in (*TEXT_COLUMNS, *columns) if c not in frame.columns]
    if missing:
        hint = (" (TRL's implicit-prompt format, without a prompt column, is not supported: split the shared "
                "prefix into a prompt column)" if missing == ["prompt"] else "")
        if set(missing) <= set(columns):
            hint = f" (choose the group column with --group-column / group_column=; columns found: " \
                   f"{sorted(map(str, frame.columns))})"
        raise ValueError(f"{name}: missing column(s) {missing}{hint}")
    frame = frame.reset_index(drop=True)
    conversational = any(_is_messages(v) for v in frame["prompt"].head(50))
    reasons = pd.Series([None] * len(frame), dtype=object)
    for col in columns:
        group_problems = _group_problems(frame[col])
        if several:
            group_problems = (col + ": " + group_problems[group_problems.notna()]).reindex(group_problems.index)
        fill = (reasons.isna() & group_problems.notna()).to_numpy()
        reasons[fill] = group_problems[fill].to_numpy()
        _refuse_merged_labels(frame[col][group_problems.isna()], col, name)
    for col in TEXT_COLUMNS:
        problem = frame[col].map(lambda v: _text_problem(v, conversational))
        fill = reasons.isna() & problem.notna()
        reasons[fill.to_numpy()] = (col + ": " + problem[fill]).to_numpy()
    same = frame.apply(lambda r: reasons.iloc[r.name] is None and
                       json.dumps(_plain(r["chosen"])) == json.dumps(_plain(r["rejected"])), axis=1) \
        if len(frame) else pd.Series([], dtype=bool)
    reasons[same.to_numpy(dtype=bool)] = "chosen == rejected"
    keep = reasons.isna().to_numpy()
    skipped = pd.DataFrame({"row": np.flatnonzero(~keep), "reason": reasons[~keep].to_numpy()})
    table = frame[keep].copy()
    if conversational:
        for col in TEXT_COLUMNS:
            table[col] = table[col].map(_plain)
    if several:
        return _several_groupings(table, columns, skipped, conversational, name, intersect, min_group_size,
                                  small_groups, limit)
    group_column, = columns
    table["group"] = table[group_column].map(_group_name)
    if group_column != "group" and "group" in frame.columns:
        table["source_group"] = frame.loc[keep, "group"]
    present = list(dict.fromkeys(table["group"]))
    if groups is not None:
        groups = [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
        absent = [g for g in groups if g not in present]
        if absent:
            raise ValueError(f"{name}: groups not found: {absent}; groups present: {present}")
        table = table[table["group"].isin(groups)]
        present = groups
    if limit is not None:
        table = table.groupby("group", sort=False).head(limit)
    if table.empty:
        raise _no_usable_pairs(name, skipped)
    if "split" in table.columns:
        table["split"] = table["split"].map(_split_name)
    return PreferencePairs(table=table.reset_index(drop=True), groups=tuple(present), skipped=skipped,
                           conversational=conversational, source=str(name))


def _no_usable_pairs(name, skipped):
    """The error for data of which no pair is usable, with the commonest reasons."""
    return ValueError(f"{name}: no usable pairs ({len(skipped)} bad rows: "
                      f"{skipped['reason'].value_counts().head(3).to_dict()})")


def _several_groupings(table, columns, skipped, conversational, name, intersect, min_group_size, small_groups,
                       limit=None):
    """:class:`PreferencePairs` of several groupings: their union (a ``"column=value"`` group per value of
    every column; each column keeps its group names) or their intersection (the cells, in ``group``)."""
    for col in columns:
        table[col] = table[col].map(_group_name)
    if limit is not None and intersect:          # the first `limit` of each cell, before small cells are handled
        if limit < min_group_size and small_groups != "keep":     # every cell would be merged or dropped
            raise ValueError(f"limit={limit} (--limit) keeps at most {limit} pairs of each cell, fewer than "
                             f"min_group_size={min_group_size} (--min-group-size): every cell would be small; "
                             "raise the limit or lower the minimum")
        table = table.groupby(columns, sort=False).head(limit)
    elif limit is not None:                      # among the first `limit` of one of its groups
        first = np.zeros(len(table), dtype=bool)
        for col in columns:
            first |= table.groupby(col, sort=False).cumcount().to_numpy() < limit
        table = table[first]
    if "group" in table.columns and "group" not in columns:
        table = table.rename(columns={"group": "source_group"})
    if table.empty:
        raise _no_usable_pairs(name, skipped)
    small = {}
    if intersect:
        from loglinear_grpo import intersect_groupings
        labels, cells, kept, small = intersect_groupings({c: table[c].to_numpy(dtype=object) for c in columns},
                                                         min_size=min_group_size, small=small_groups)
        if not kept.all():
            dropped = pd.DataFrame({"row": table.index.to_numpy()[~kept],
                                    "reason": f"small cell (< {min_group_size} pairs, --small-groups drop)"})
            skipped = (pd.concat([skipped, dropped], ignore_index=True).sort_values("row", kind="stable")
                       .reset_index(drop=True) if len(skipped) else dropped)
        table = table[kept].copy()
        table["group"] = np.asarray(cells, dtype=object)[labels[kept]]
        present = list(cells)
    else:
        present = [f"{c}={v}" for c in columns for v in dict.fromkeys(table[c])]
    if "split" in table.columns:
        table["split"] = table["split"].map(_split_name)
    return PreferencePairs(table=table.reset_index(drop=True), groups=tuple(present), skipped=skipped,
                           conversational=conversational, source=str(name), groupings=tuple(columns),
                           intersect=bool(intersect), small_cells=dict(small))


def _label_kind(value):
    """The JSON type of a group label: ``string``, ``number``, ``boolean``, or None (not a label)."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    return None


def _group_problems(group):
    """Why each row's group label is unusable (``None`` where it is fine)."""
    def problem(value):
        kind = _label_kind(value)
        if kind is None:
            if value is None or value is pd.NA or value is pd.NaT:
                return "missing group"
            return f"group label is {type(value).__name__}, not a string or number"
        if kind == "string":
            return None if value.strip() else "empty group"
        if kind == "number" and not np.isfinite(float(value)):
            return "missing group"           # NaN: pandas' missing value (inf is no label either)
        return None
    return pd.Series([problem(v) for v in group], index=group.index, dtype=object)


def _refuse_merged_labels(labels, group_column, name):
    """A ``ValueError`` if labels of different types read as one group name (``1`` and ``"1"``)."""
    kinds = {}
    for value in labels:
        kinds.setdefault(_group_name(value), {}).setdefault((_label_kind(value), repr(value)), [value, 0])[1] += 1
    clashes = {g: found for g, found in kinds.items() if len({kind for kind, _ in found}) > 1}
    if clashes:
        def describe(found):
            return " and ".join(f"{value!r} ({kind}, {count} row{'' if count == 1 else 's'})"
                                for (kind, _), (value, count) in found.items())
        shown = "; ".join(describe(found) for found in list(clashes.values())[:3])
        raise ValueError(f"{name}: group column {group_column!r} has labels of different types that would read as "
                         f"the same group ({len(clashes)} such group name(s)): {shown}. Labels are kept as the file "
                         "has them; make the column one type (e.g. every label a string)")


def _group_name(value):
    """A group's name: a string label as it is, a number in its decimal form (``3.0`` → ``"3"``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value)


def _split_name(value):
    """``train``/``val``/``test`` for a split label; ``None`` for a missing one (an empty CSV cell too)."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)) or \
            (isinstance(value, str) and not value.strip()):
        return None
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"split column: unknown split name {value!r}; use train/val/test "
                         "(validation/dev/eval also mean val)")
    return name


def assign_splits(pairs, seed=0, split=(0.8, 0.1, 0.1), split_by=None):
    """The ``split`` of every pair: the given ``split`` column where there is one, else a seeded split
    of the distinct values of ``split_by`` (default: the prompt), so that no prompt (no value) is in
    two splits. Returns a Series aligned with ``pairs.table``."""
    table = pairs.table
    if "split" in table.columns and table["split"].notna().all():
        return table["split"].copy()
    fractions = np.asarray(split, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
    if split_by is None:
        keys = table["prompt"].map(prompt_key)
    elif split_by not in table.columns:
        raise ValueError(f"split_by: no column {split_by!r}; columns: {sorted(map(str, table.columns))}")
    else:
        keys = table[split_by].map(lambda v: json.dumps(_plain(v), sort_keys=True, default=str))
    unique = pd.unique(keys)
    order = np.random.default_rng(seed).permutation(len(unique))
    cut = np.round(np.cumsum(fractions)[:2] * len(unique)).astype(int)
    labels = np.empty(len(unique), dtype=object)
    labels[order[:cut[0]]], labels[order[cut[0]:cut[1]]], labels[order[cut[1]:]] = "train", "val", "test"
    return pd.Series(pd.Series(labels, index=unique).loc[keys].to_numpy(), index=table.index)


def load_preference_pairs(data, *, group_column="group", groups=None, limit=None, countries=None,
                          hub_split=None, answer=None, template=None, name=None, na_values=None, strict=False,
                          intersect=False, min_group_size=1, small_groups="keep"):
    """Grouped preference pairs from a path, a hub id, a ``datasets`` object (or a ``save_to_disk``
    folder) or a DataFrame.

    GlobalOpinionQA's table is detected and converted (all options of a question become its
    candidates, with the country's survey distribution as the target); see
    :func:`llm_head.opinions.opinion_pairs`. ``group_column`` may name several columns (their union, or
    with ``intersect=True`` their cells: :func:`pairs_from_frame`). ``limit`` keeps the first ``limit``
    pairs of each group (overlapping groups: a pair stays when it is among the first ``limit`` of one
    of its groups, so every group keeps at least ``limit`` pairs, or all it has);
    ``name`` is how messages call the data (default: its path or hub id); ``na_values`` are the
    strings that mean "missing" (default none; see :func:`read_table`: files are read as they are).
    A JSON Lines line that is not a JSON object is skipped and reported (``skipped`` rows with its
    1-based ``line`` and the reason ``malformed JSON line``); ``strict=True`` refuses the data instead,
    with the line number.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    frame, read_name = read_table(data, split=hub_split, na_values=na_values, strict=strict)
    bad_lines = frame.attrs.pop("bad_lines", [])
    name = name or read_name
    pairs = _load_pairs(frame, name, group_column, groups, limit, countries, answer, template,
                        dict(intersect=intersect, min_group_size=min_group_size, small_groups=small_groups))
    if bad_lines:
        bad = pd.DataFrame({"row": pd.Series([None] * len(bad_lines), dtype=object),
                            "line": [n for n, _ in bad_lines], "reason": "malformed JSON line",
                            "detail": [r for _, r in bad_lines]})
        rest = pairs.skipped.astype({"row": object}) if "row" in pairs.skipped.columns else pairs.skipped
        pairs.skipped = pd.concat([bad, rest], ignore_index=True) if len(rest) else bad
    return pairs


def _load_pairs(frame, name, group_column, groups, limit, countries, answer, template, grouping=None):
    kind = detect_format(frame, name)
    if kind == "global_opinions":
        if len(_group_columns(group_column)) > 1 or grouping and (
                grouping["intersect"] or grouping["min_group_size"] != 1 or grouping["small_groups"] != "keep"):
            raise ValueError(f"{name}: a GlobalOpinionQA table is grouped by country; several group columns "
                             "(--group-columns, --intersect, --min-group-size, --small-groups) apply to preference "
                             "pairs (convert the table to pairs with a column per grouping)")
        kwargs = {k: v for k, v in (("template", template), ("answer", answer)) if v is not None}
        items = load_global_opinions(frame=frame, countries=countries or groups or PAPER_COUNTRIES, **kwargs)
        if limit is not None:
            items.table = items.table.groupby("group", sort=False).head(limit).reset_index(drop=True)
        pairs = opinion_pairs(items, source=name)
        pairs.opinion_items = items
        return pairs
    return pairs_from_frame(frame, group_column=group_column, name=name, groups=groups, limit=limit,
                            **(grouping or {}))


# ============================================================================ items (what the LLM reads)
def items_from_pairs(pairs):
    """The distinct prompts and their candidate answers — what the frozen LLM is run on.

    Returns a DataFrame with ``prompt``, ``candidates`` (a list; the answers this prompt's pairs use,
    in order of appearance, or the whole candidate set given by ``pairs.candidate_sets``) and
    ``targets`` (the target distribution over the candidates, or ``None``).
    """
    table = pairs.table
    sets = pairs.candidate_sets or {}
    order, candidates = {}, {}
    for prompt, chosen, rejected in zip(table["prompt"], table["chosen"], table["rejected"]):
        key = prompt_key(prompt)
        if key not in order:
            order[key] = prompt
            candidates[key] = {} if key not in sets else {prompt_key(c): c for c in sets[key][0]}
        for answer in (chosen, rejected):
            candidates[key].setdefault(prompt_key(answer), answer)
    rows = []
    for key, prompt in order.items():
        cands = list(candidates[key].values())
        targets = None
        if key in sets and len(sets[key][0]) == len(cands):
            targets = np.asarray(sets[key][1], dtype=np.float64)
        rows.append({"prompt": prompt, "candidates": cands, "targets": targets})
    return pd.DataFrame(rows, columns=["prompt", "candidates", "targets"])


def pair_indices(table, items, groups, union=()):
    """Item and candidate indices of every pair (``item``, ``chosen``, ``rejected``, ``group`` as 0..K−1)
    by looking the prompts and answers up in ``items``; a ``ValueError`` if one is not there (the data
    changed since the features were extracted).

    ``union`` (:attr:`PreferencePairs.union`): the grouping columns of overlapping groups; then there is
    no ``group`` column but one ``group/<column>`` per grouping, each the index in ``groups`` of the
    pair's group ``"<column>=<value>"`` (what :class:`llm_head.train.HeadProblem` reads)."""
    group_of = {g: k for k, g in enumerate(groups)}
    if union:
        out = pair_indices(table.assign(group=groups[0]), items, groups).drop(columns="group")
        for col in union:
            codes = (col + "=" + table[col].astype(str)).map(group_of)
            if codes.isna().any():
                r = int(np.flatnonzero(codes.isna().to_numpy())[0])
                raise ValueError(f"pair {r}: unknown group {col}={table[col].iloc[r]!r}")
            out[f"group/{col}"] = codes.to_numpy(dtype=np.int64)
        return out
    item_of = {prompt_key(p): i for i, p in enumerate(items["prompt"])}
    cand_of = [{prompt_key(c): j for j, c in enumerate(cands)} for cands in items["candidates"]]
    out = np.empty((len(table), 4), dtype=np.int64)
    for r, (prompt, chosen, rejected, group) in enumerate(zip(table["prompt"], table["chosen"], table["rejected"],
                                                              table["group"])):
        i = item_of.get(prompt_key(prompt))
        if i is None:
            raise ValueError(f"pair {r}: its prompt is not among the extracted items; extract again")
        c, j = cand_of[i].get(prompt_key(chosen)), cand_of[i].get(prompt_key(rejected))
        if c is None or j is None:
            raise ValueError(f"pair {r}: its answers are not among the extracted candidates; extract again")
        if group not in group_of:
            raise ValueError(f"pair {r}: unknown group {group!r}")
        out[r] = (i, c, j, group_of[group])
    return pd.DataFrame(out, columns=["item", "chosen", "rejected", "group"])
