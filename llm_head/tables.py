"""The pair table everything in :mod:`llm_head` works on, and reading tables from files, ``datasets``
objects and the hub: :class:`PreferencePairs`, :func:`prompt_key` and :func:`read_table`.

This is the layer under :mod:`llm_head.data` (which recognises the formats, turns rows into pairs and
re-exports these names) and :mod:`llm_head.opinions` (GlobalOpinionQA's adapter onto the same
table): both import it, it imports neither, so that the two form no import cycle. How cells are
read (never re-typed) is described in :mod:`llm_head.data` and :func:`read_table`.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

FILE_READERS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PreferencePairs:
    """Grouped preference pairs: one row per pair, plus what was skipped and why.

    Attributes
    ----------
    table : pandas.DataFrame
        ``prompt``, ``chosen``, ``rejected`` (str, or lists of ``{"role", "content"}`` messages when
        ``conversational``), ``group`` (str), ``split`` (``train``/``val``/``test`` or missing), and any
        other columns of the source. With several groupings (``groupings``) each grouping's column
        holds its group names (str); the union of the groupings has no ``group`` column (a pair is in
        one group of each grouping), their intersection has the cell's name in ``group``.
    groups : tuple of str
        The group names, in order (the label of group g is ``groups[g]``). The union of several
        groupings names its groups ``"country=Kenya"``, the intersection its cells
        ``"country=Kenya & age=18-24"``.
    groupings : tuple of str
        The group columns when there are several (``()`` for one group column, ``group``).
    intersect : bool
        With several groupings: the groups are the cells of their cross product (plain labels, in
        ``group``) rather than the union of their groups.
    small_cells : dict
        The intersection's cells with fewer pairs than the stated minimum: {cell: pairs} (merged,
        dropped or kept as asked; :func:`loglinear_grpo.intersect_groupings`).
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
    groupings: tuple = ()
    intersect: bool = False
    small_cells: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.table)

    @property
    def union(self):
        """The grouping columns whose union the groups are (``()`` for plain labels: one group column, or
        the cells of an intersection)."""
        return tuple(self.groupings) if self.groupings and not self.intersect else ()

    def group_sizes(self):
        """Pairs per group, in the order of ``groups`` (with overlapping groups a pair counts in each of
        its groups)."""
        if self.union:
            counts = pd.concat([(col + "=" + self.table[col].astype(str)).value_counts() for col in self.union])
            return counts.reindex(list(self.groups), fill_value=0)
        return self.table["group"].value_counts().reindex(list(self.groups), fill_value=0)

    def report(self):
        """A short human-readable summary: pairs per group, what was skipped."""
        sizes = ", ".join(f"{g} {n}" for g, n in self.group_sizes().items())
        if self.union:
            per = ", ".join(f"{col}: {sum(g.startswith(col + '=') for g in self.groups)}" for col in self.union)
            text = (f"{len(self)} pairs in {len(self.groups)} overlapping groups, the union of {len(self.union)} "
                    f"groupings ({per}; each pair in one group of each) ({sizes})")
        elif self.groupings:
            text = (f"{len(self)} pairs in {len(self.groups)} cells of {' x '.join(self.groupings)} ({sizes})")
        else:
            text = f"{len(self)} pairs in {len(self.groups)} groups ({sizes})"
        if self.small_cells:
            shown = ", ".join(f"{c} {n}" for c, n in list(self.small_cells.items())[:5])
            text += (f"; {len(self.small_cells)} cell(s) below the minimum size ({shown}"
                     f"{', …' if len(self.small_cells) > 5 else ''})")
        small = self.skipped["reason"].astype(str).str.startswith("small cell") if len(self.skipped) else None
        if small is not None and small.any():           # not bad rows: the pairs of the cells asked to be dropped
            text += f"; dropped the {int(small.sum())} pairs of the small cells (--small-groups drop)"
        bad = self.skipped[~small.to_numpy()] if small is not None else self.skipped
        if len(bad):
            reasons = bad["reason"].value_counts()
            text += f"; skipped {len(bad)} bad rows (" + \
                ", ".join(f"{r}: {n}" for r, n in reasons.items()) + ")"
            if "line" in self.skipped.columns and self.skipped["line"].notna().any():
                lines = [(int(n), None) for n in self.skipped["line"].dropna()]
                text += f"; {describe_bad_lines(lines)} left out"
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


# ============================================================================ reading
def read_table(source, split=None, na_values=None, strict=False):
    """A DataFrame from a file path, a ``datasets.Dataset``/``DatasetDict`` (or a folder written by
    their ``save_to_disk``) or a hub id.

    Parameters
    ----------
    source : path, str, datasets.Dataset, datasets.DatasetDict or DataFrame
        A ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a ``save_to_disk`` folder (read with
        ``datasets.load_from_disk``), a hub id, or a table.
    split : str, optional
        One hub split (``datasets.load_dataset(id, split=...)``).
    na_values : str or sequence of str, optional
        Cells (anywhere in the table) exactly equal to one of these strings are read as missing;
        default none: every string is text as it is (``"NA"``, ``"None"``, ``"N/A"`` included).
    strict : bool
        A JSON Lines line that is not a JSON object refuses the file (``ValueError`` with its line
        number). Default: such lines are left out and listed in ``frame.attrs["bad_lines"]``
        (``(line, reason)``, 1-based), which :func:`llm_head.data.load_preference_pairs` reports
        among the skipped rows.

    Returns
    -------
    (frame, name)
        A ``DatasetDict`` is concatenated with its split names in a ``split`` column (one with a
        single split has no ``split`` column: the pairs get the seeded split).

    Notes
    -----
    Nothing is re-typed on reading: a CSV is read with ``dtype=str`` and ``keep_default_na=False``
    (every cell is the text of the file; an empty cell is the empty string), JSON and JSON Lines
    with :mod:`json` into ``object`` columns (each cell the value the file holds: a string, a
    number, a list of messages, ``None`` for ``null``, missing where a key is absent), parquet and
    ``datasets`` objects with their own column types. Text files are decoded as ``utf-8-sig``: a
    leading byte-order mark is dropped. A CSV's delimiter (``,``, ``;``, tab or ``|``) is detected
    from its first lines. An empty file is refused as empty.
    """
    frame, name = _read_source(source, split, strict)
    bad = frame.attrs.get("bad_lines", [])
    frame = _apply_na_values(frame, na_values)
    frame.attrs["bad_lines"] = bad
    return frame, name


def _read_source(source, split, strict=False):
    try:
        import datasets
    except ImportError:          # pragma: no cover - datasets is in the llm extra
        datasets = None
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        if len(source) == 1:             # one split (often "train" alone): no split given, draw one
            return next(iter(source.values())).to_pandas(), "DatasetDict"
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
            if not _is_saved_dataset(path):
                raise ValueError(f"{path} is a folder: give a .jsonl, .json, .csv or .parquet file, or a folder "
                                 "written by datasets' save_to_disk")
            if datasets is None:             # pragma: no cover
                raise ImportError(f"{path} is a datasets folder; reading it needs `pip install datasets`")
            try:
                loaded = datasets.load_from_disk(path)
            except Exception as exc:
                raise ValueError(f"{path} could not be read with datasets.load_from_disk: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from None
            return _read_source(loaded, None)[0], path
        if ext not in FILE_READERS:
            raise ValueError(f"{path}: unknown file type {ext!r}; use .jsonl, .json, .csv or .parquet")
        if _is_empty_file(path, ext):
            raise ValueError(f"{path} is empty: no rows (expected {FILE_READERS[ext]} preference pairs)")
        if ext == ".jsonl":                  # its own messages: each names the (1-based) line
            return _read_json_lines(path, strict, path), path
        try:
            if ext == ".json":
                frame = _read_json(path, strict)
            elif ext == ".csv":
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                                    sep=_csv_delimiter(path))
            else:
                frame = pd.read_parquet(path)
        except Exception as exc:             # pandas/pyarrow/json raise many types: one clear message
            if isinstance(exc, ValueError) and str(exc).startswith(path):
                raise                        # already ours (a JSON Lines line, by number)
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


def _json_lines(lines, strict=False, name="data"):
    """Records from JSON Lines (blank lines skipped). A line that is not a JSON object raises a
    ``ValueError`` naming its (1-based) line when ``strict``; otherwise it is left out and listed in
    ``frame.attrs["bad_lines"]`` as ``(line, reason)``."""
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"not valid JSON ({exc.msg} at column {exc.colno})"
        else:
            if isinstance(value, dict):
                records.append(value)
                continue
            reason = f"a JSON {type(value).__name__}, not an object"
        if strict:
            raise ValueError(f"{name}: line {number} is {reason} (strict: without it, bad lines are skipped "
                             "and reported)")
        bad.append((number, reason))
    if bad and not records:
        raise ValueError(f"{name} could not be read as jsonl: no line is a JSON object ({describe_bad_lines(bad)}; "
                         f"line {bad[0][0]} is {bad[0][1]})")
    frame = _records_frame(records)
    frame.attrs["bad_lines"] = bad
    return frame


def describe_bad_lines(bad, shown=5):
    """``"2 malformed JSON lines (3, 7)"``: the count and the first few (1-based) line numbers."""
    numbers = ", ".join(str(n) for n, _ in bad[:shown]) + (", …" if len(bad) > shown else "")
    return f"{len(bad)} malformed JSON line{'' if len(bad) == 1 else 's'} ({numbers})"


def _read_json_lines(path, strict=False, name=None):
    """A JSON Lines file, one object per line, parsed by :mod:`json` (nothing re-typed)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return _json_lines(fh, strict, name or path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} could not be read as jsonl: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None


def _is_saved_dataset(path):
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("dataset_dict.json") or (has("dataset_info.json") and has("state.json"))


def _is_empty_file(path, ext):
    """No bytes, or (a text file) only white space."""
    size = os.path.getsize(path)
    if size == 0 or ext == ".parquet" or size > 4096:
        return size == 0
    with open(path, "rb") as fh:
        return not fh.read().decode("utf-8-sig", errors="replace").strip()


CSV_DELIMITERS = ",;\t|"


def _csv_delimiter(path):
    """The delimiter of a CSV (``,``, ``;``, tab or ``|``) by :class:`csv.Sniffer` on its first lines;
    another than ``,`` only where it splits the header into more columns than ``,`` does."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        sample = "".join(line for _, line in zip(range(20), fh))
    try:
        found = csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","
    header = sample.splitlines()[0] if sample else ""
    count = lambda d: len(next(csv.reader([header], delimiter=d), []))  # noqa: E731
    return found if found != "," and count(found) > count(",") else ","


def _read_json(path, strict=False):
    """A JSON file: an array of records, an object of columns (lists, or ``{row: value}`` as pandas'
    ``to_json`` writes them), or JSON Lines under a ``.json`` name; parsed by :mod:`json`."""
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":        # more than one JSON value: JSON Lines
            raise
        return _json_lines(text.split("\n"), strict, path)  # not splitlines(): U+2028 may sit in a string
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
