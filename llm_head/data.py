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

Bad rows — a missing, empty or non-string text, chosen == rejected, a missing or empty group — are
counted, reported (``skipped``, with the reason) and left out. A file that is neither format gives
one ``ValueError`` naming the file and the columns it has.

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
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "eval": "val", "test": "test", "testing": "test"}
FILE_READERS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PreferencePairs:
    """Grouped preference pairs: one row per pair, plus what was skipped and why.

    Attributes
    ----------
    table : pandas.DataFrame
        ``prompt``, ``chosen``, ``rejected`` (str, or lists of ``{"role", "content"}`` messages when
        ``conversational``), ``group`` (str), ``split`` (``train``/``val``/``test`` or missing), and any
        other columns of the source.
    groups : tuple of str
        The group names, in order (the label of group g is ``groups[g]``).
    skipped : pandas.DataFrame
        ``row`` (in the source), ``reason``.
    conversational : bool
        TRL's conversational format.
    source : str
        Where the pairs came from (for reports and the work folder).
    candidate_sets : dict, optional
        prompt key → (list of all candidate answers, their target probabilities): the survey
        distribution of GlobalOpinionQA, for the Jensen–Shannon distance. Without it, a prompt's
        candidates are the answers its pairs use.
    opinion_items : llm_head.opinions.OpinionItems, optional
        For GlobalOpinionQA, the (question × country) items the pairs were drawn from (each seed
        draws its own rejected answers from them).
    """

    table: pd.DataFrame
    groups: tuple
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["row", "reason"]))
    conversational: bool = False
    source: str = ""
    candidate_sets: dict | None = None
    opinion_items: object = None

    def __len__(self):
        return len(self.table)

    def group_sizes(self):
        return self.table["group"].value_counts().reindex(list(self.groups), fill_value=0)

    def report(self):
        """A short human-readable summary: pairs per group, what was skipped."""
        sizes = ", ".join(f"{g} {n}" for g, n in self.group_sizes().items())
        text = f"{len(self)} pairs in {len(self.groups)} groups ({sizes})"
        if len(self.skipped):
            reasons = self.skipped["reason"].value_counts()
            text += f"; skipped {len(self.skipped)} bad rows (" + \
                ", ".join(f"{r}: {n}" for r, n in reasons.items()) + ")"
        return text


def prompt_key(prompt):
    """A hashable key for a prompt (a string, or the JSON of a message list)."""
    return prompt if isinstance(prompt, str) else json.dumps(_plain(prompt), sort_keys=True)


def _plain(value):
    """Messages as plain Python (``datasets``/Arrow may hand over numpy arrays of dicts)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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


# ============================================================================ reading
def read_table(source, split=None, na_values=None):
    """A DataFrame from a file path, a ``datasets.Dataset``/``DatasetDict`` or a hub id.

    Parameters
    ----------
    source : path, str, datasets.Dataset, datasets.DatasetDict or DataFrame
        A ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a hub id, or a table.
    split : str, optional
        One hub split (``datasets.load_dataset(id, split=...)``).
    na_values : str or sequence of str, optional
        Cells (anywhere in the table) exactly equal to one of these strings are read as missing;
        default none: every string is text as it is (``"NA"``, ``"None"``, ``"N/A"`` included).

    Returns
    -------
    (frame, name)
        A ``DatasetDict`` is concatenated with its split names in a ``split`` column.

    Notes
    -----
    Nothing is re-typed on reading: a CSV is read with ``dtype=str`` and ``keep_default_na=False``
    (every cell is the text of the file; an empty cell is the empty string), JSON and JSON Lines
    with :mod:`json` into ``object`` columns (each cell the value the file holds: a string, a
    number, a list of messages, ``None`` for ``null``, missing where a key is absent), parquet and
    ``datasets`` objects with their own column types. Text files are decoded as ``utf-8-sig``: a
    leading byte-order mark is dropped.
    """
    frame, name = _read_source(source, split)
    return _apply_na_values(frame, na_values), name


def _read_source(source, split):
    try:
        import datasets
    except ImportError:          # pragma: no cover - datasets is in the llm extra
        datasets = None
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        frames = [ds.to_pandas().assign(split=name) for name, ds in source.items()]
        return pd.concat(frames, ignore_index=True), "DatasetDict"
    if datasets is not None and isinstance(source, datasets.Dataset):
        return source.to_pandas(), "Dataset"
    if isinstance(source, pd.DataFrame):
        return source.copy(), "DataFrame"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"data must be a file path, a hub id, a datasets.Dataset/DatasetDict or a DataFrame, "
                         f"got {type(source).__name__}")
    path = os.fspath(source)
    ext = os.path.splitext(path)[1].lower()
    if os.path.exists(path):
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder: give a .jsonl, .json, .csv or .parquet file")
        if ext not in FILE_READERS:
            raise ValueError(f"{path}: unknown file type {ext!r}; use .jsonl, .json, .csv or .parquet")
        try:
            if ext == ".jsonl":
                frame = _read_json_lines(path)
            elif ext == ".json":
                frame = _read_json(path)
            elif ext == ".csv":
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            else:
                frame = pd.read_parquet(path)
        except Exception as exc:             # pandas/pyarrow/json raise many types: one clear message
            raise ValueError(f"{path} could not be read as {FILE_READERS[ext]}: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
        return frame, path
    if ext in FILE_READERS or (os.sep in path and not _looks_like_hub_id(path)) or _looks_like_file(path):
        raise ValueError(f"{path}: no such file")
    if datasets is None:                     # pragma: no cover
        raise ImportError(f"{path!r} is not a file; reading it from the hub needs `pip install datasets`")
    try:
        loaded = datasets.load_dataset(path, split=split)
    except Exception as exc:                 # the hub's many failure types: one message
        raise ValueError(f"{path!r} is not a local file and could not be loaded from the Hugging Face hub "
                         f"({type(exc).__name__}: {str(exc)[:160]}); check the path or the dataset id") from None
    return _read_source(loaded, None)[0], path


def _records_frame(records):
    """Records (dicts) as a frame of ``object`` columns: each cell exactly the parsed JSON value."""
    return pd.DataFrame.from_records(records) if not records else pd.DataFrame(records, dtype=object)


def _json_lines(lines):
    """Records from JSON Lines (blank lines skipped); a ``ValueError`` naming the first bad line."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"line {number} is a JSON {type(value).__name__}, not an object")
        records.append(value)
    return _records_frame(records)


def _read_json_lines(path):
    """A JSON Lines file, one object per line, parsed by :mod:`json` (nothing re-typed)."""
    with open(path, encoding="utf-8-sig") as fh:
        return _json_lines(fh)


def _read_json(path):
    """A JSON file: an array of records, an object of columns (lists, or ``{row: value}`` as pandas'
    ``to_json`` writes them), or JSON Lines under a ``.json`` name; parsed by :mod:`json`."""
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":        # more than one JSON value: JSON Lines
            raise
        return _json_lines(text.split("\n"))      # not splitlines(): U+2028 may sit inside a string
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return _records_frame(value)
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in value.items()})
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return pd.DataFrame.from_dict(value, dtype=object)
    raise ValueError("expected an array of objects (records), an object of columns, or JSON Lines")


def _apply_na_values(frame, na_values):
    """Cells equal to one of ``na_values`` (strings) become missing (``None``); nothing else changes."""
    if na_values is None:
        return frame
    na = {na_values} if isinstance(na_values, str) else set(na_values)
    if not all(isinstance(v, str) for v in na):
        raise ValueError(f"na_values must be strings, got {sorted(map(repr, na))}")
    if not na:
        return frame
    frame = frame.copy()
    for col in frame.columns:
        hit = frame[col].map(lambda v: isinstance(v, str) and v in na).to_numpy(dtype=bool)
        if hit.any():
            column = frame[col].astype(object).to_numpy(copy=True)
            column[hit] = None
            frame[col] = pd.Series(column, index=frame.index, dtype=object)
    return frame


def _looks_like_file(text):
    """A name with a file extension (``x.jsnol``, ``data.tsv``): a mistyped path, not a hub id."""
    base = text.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return bool(dot and stem and ext.isalpha() and 2 <= len(ext) <= 8)


def _looks_like_hub_id(text):
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/"))


def detect_format(frame, name="data"):
    """``"global_opinions"`` or ``"pairs"``; a ``ValueError`` naming the columns found otherwise."""
    cols = set(frame.columns)
    if {"question", "selections", "options"} <= cols:
        return "global_opinions"
    if {"chosen", "rejected"} <= cols:
        return "pairs"
    raise ValueError(f"{name}: neither preference pairs (needs columns prompt, chosen, rejected and a group "
                     f"column) nor a GlobalOpinionQA table (question, selections, options); found columns "
                     f"{sorted(map(str, cols))}")


# ============================================================================ pairs
def pairs_from_frame(frame, *, group_column="group", name="data", groups=None):
    """Validate and clean a frame of preference pairs into :class:`PreferencePairs`.

    Parameters
    ----------
    frame : DataFrame
        TRL's standard or conversational preference format plus a group column.
    group_column : str
        The column holding each pair's group: strings (the group's name, as it is), or numbers
        (named by their decimal form, ``3`` → ``"3"``). A label that is missing (``None``, NaN,
        absent) or an empty string is a bad row (reason ``missing group`` / ``empty group``); labels
        of different types that read as one name (``1`` and ``"1"``) raise ``ValueError``.
    groups : sequence of str, optional
        Keep only these groups, in this order (default: all, in order of first appearance).

    Raises
    ------
    ValueError
        A missing column; labels of different types that read as one group; no usable pair.
    """
    missing = [c for c in (*TEXT_COLUMNS, group_column) if c not in frame.columns]
    if missing:
        hint = (" (TRL's implicit-prompt format, without a prompt column, is not supported: split the shared "
                "prefix into a prompt column)" if missing == ["prompt"] else "")
        if missing == [group_column]:
            hint = f" (choose the group column with --group-column / group_column=; columns found: " \
                   f"{sorted(map(str, frame.columns))})"
        raise ValueError(f"{name}: missing column(s) {missing}{hint}")
    frame = frame.reset_index(drop=True)
    conversational = any(_is_messages(v) for v in frame["prompt"].head(50))
    reasons = pd.Series([None] * len(frame), dtype=object)
    group_problems = _group_problems(frame[group_column])
    reasons[group_problems.notna().to_numpy()] = group_problems[group_problems.notna()].to_numpy()
    _refuse_merged_labels(frame[group_column][group_problems.isna()], group_column, name)
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
    table["group"] = table[group_column].map(_group_name)
    if group_column != "group" and "group" in frame.columns:
        table["source_group"] = frame.loc[keep, "group"]
    if conversational:
        for col in TEXT_COLUMNS:
            table[col] = table[col].map(_plain)
    present = list(dict.fromkeys(table["group"]))
    if groups is not None:
        groups = [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
        absent = [g for g in groups if g not in present]
        if absent:
            raise ValueError(f"{name}: groups not found: {absent}; groups present: {present}")
        table = table[table["group"].isin(groups)]
        present = groups
    if table.empty:
        raise ValueError(f"{name}: no usable pairs ({len(skipped)} bad rows: "
                         f"{skipped['reason'].value_counts().head(3).to_dict()})")
    if "split" in table.columns:
        table["split"] = table["split"].map(_split_name)
    return PreferencePairs(table=table.reset_index(drop=True), groups=tuple(present), skipped=skipped,
                           conversational=conversational, source=str(name))


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
                          hub_split=None, answer=None, template=None, name=None, na_values=None):
    """Grouped preference pairs from a path, a hub id, a ``datasets`` object or a DataFrame.

    GlobalOpinionQA's table is detected and converted (all options of a question become its
    candidates, with the country's survey distribution as the target); see
    :func:`llm_head.opinions.opinion_pairs`. ``limit`` keeps the first ``limit`` pairs of each group;
    ``name`` is how messages call the data (default: its path or hub id); ``na_values`` are the
    strings that mean "missing" (default none; see :func:`read_table`: files are read as they are).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    frame, read_name = read_table(data, split=hub_split, na_values=na_values)
    name = name or read_name
    kind = detect_format(frame, name)
    if kind == "global_opinions":
        from .opinions import PAPER_COUNTRIES, load_global_opinions, opinion_pairs
        kwargs = {k: v for k, v in (("template", template), ("answer", answer)) if v is not None}
        items = load_global_opinions(frame=frame, countries=countries or groups or PAPER_COUNTRIES, **kwargs)
        if limit is not None:
            items.table = items.table.groupby("group", sort=False).head(limit).reset_index(drop=True)
        pairs = opinion_pairs(items, source=name)
        pairs.opinion_items = items
        return pairs
    pairs = pairs_from_frame(frame, group_column=group_column, name=name, groups=groups)
    if limit is not None:
        pairs.table = pairs.table.groupby("group", sort=False).head(limit).reset_index(drop=True)
    return pairs


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


def pair_indices(table, items, groups):
    """Item and candidate indices of every pair (``item``, ``chosen``, ``rejected``, ``group`` as 0..K−1)
    by looking the prompts and answers up in ``items``; a ``ValueError`` if one is not there (the data
    changed since the features were extracted)."""
    item_of = {prompt_key(p): i for i, p in enumerate(items["prompt"])}
    cand_of = [{prompt_key(c): j for j, c in enumerate(cands)} for cands in items["candidates"]]
    group_of = {g: k for k, g in enumerate(groups)}
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
