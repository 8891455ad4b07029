"""GlobalOpinionQA (Durmus et al. 2023) as group preference data: countries are the groups (§5.2).

The original file ``global_opinions.csv`` (Hugging Face ``Anthropic/llm_global_opinions``) has
columns ``question, selections, options, source``; ``selections`` is the string form of a
``defaultdict(<class 'list'>, {country: [p_1, ..., p_k]})`` and ``options`` of a Python list.

:func:`load_global_opinions` turns it into one *item* per (question, country) — the prompt
``x ⊕ g``, the candidate answers and the country's survey distribution — and
:func:`make_pairs` draws the preference pairs (chosen = the country's most likely option,
rejected = another option drawn with a seed) and the train/val/test split.
"""
from __future__ import annotations

import ast
import string
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .tables import PreferencePairs, prompt_key, read_table

#: the paper's five countries (§5.2), in its group order
PAPER_COUNTRIES = ("Nigeria", "Egypt", "India (Current national sample)", "China", "Japan")

#: the prompt of the paper's code: ``{options}`` is one ``"A. text"`` line per option
DEFAULT_TEMPLATE = ("Opinion of people in {country} on: {question}\n"
                    "Please select the best response:\n{options}\nAnswer:")
#: a candidate answer y is this string with the option's letter (a single token for most tokenizers)
DEFAULT_ANSWER = " {letter}"
LETTERS = string.ascii_uppercase
PROB_TOLERANCE = 0.02
HUB_ID = "Anthropic/llm_global_opinions"


@dataclass
class OpinionItems:
    """One row per (question, country) in ``table``, plus the rows that were skipped and why.

    ``table`` columns: ``question_id``, ``question``, ``country``, ``group`` (0..K−1, in the order
    of ``countries``), ``options`` (list), ``probs`` (ndarray, sums to 1), ``prompt``,
    ``candidates`` (list of answer strings, one per option).
    """

    table: pd.DataFrame
    countries: tuple
    skipped: pd.DataFrame

    def __len__(self):
        return len(self.table)

    def group_sizes(self):
        return self.table["group"].value_counts().reindex(range(len(self.countries)), fill_value=0).to_numpy()


def _parse_selections(text):
    text = str(text)
    start, stop = text.find("{"), text.rfind("}")
    if start < 0 or stop < start:
        raise ValueError("selections is not a defaultdict(...) / dict string")
    value = ast.literal_eval(text[start:stop + 1])
    if not isinstance(value, dict):
        raise ValueError("selections is not a dict")
    return value


def _parse_options(text):
    value = ast.literal_eval(str(text)) if not isinstance(text, (list, tuple)) else text
    if not isinstance(value, (list, tuple)):
        raise ValueError("options is not a list")
    return [str(v) for v in value]


def format_prompt(question, options, country, template=DEFAULT_TEMPLATE):
    """``x ⊕ g``: the template filled with the country, the question and lettered options."""
    lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return template.format(country=country, question=str(question).strip(), options=lines)


def read_global_opinions(path=None):
    """The raw GlobalOpinionQA table: from a local file, or from the Hugging Face hub (``path=None``).

    A local file is read by :func:`llm_head.data.read_table`: a CSV as text (``dtype=str``, no
    default NA strings, ``utf-8-sig`` so a byte-order mark is dropped), so that a question or an
    option such as ``None`` or ``NA`` stays text.
    """
    if path is not None:
        frame, _ = read_table(path)
    else:
        try:
            import datasets
        except ImportError as exc:   # pragma: no cover - depends on the environment
            raise ImportError("reading from the hub needs `pip install datasets`; or pass a local "
                              "path to global_opinions.csv") from exc
        frame = datasets.load_dataset(HUB_ID, split="train").to_pandas()
    missing = {"question", "selections", "options"} - set(frame.columns)
    if missing:
        raise ValueError(f"not a GlobalOpinionQA table: missing columns {sorted(missing)}")
    return frame


def load_global_opinions(path=None, countries=None, template=DEFAULT_TEMPLATE,
                         answer=DEFAULT_ANSWER, frame=None):
    """Items (question × country) for the chosen countries; bad rows are reported and skipped.

    A row is skipped (and listed in ``skipped`` with the reason) when its question is missing or
    empty, when its options are empty or
    unparsable, when there are more options than letters, when a country's probability vector
    is not a list, has the wrong length, is negative or does not sum to 1 ± 0.02, or when
    ``selections`` cannot be parsed. ``countries`` is a list of names, one name, or ``None`` (the
    paper's five); a country that never occurs raises ``ValueError``.
    """
    countries = PAPER_COUNTRIES if countries is None else countries
    countries = (countries,) if isinstance(countries, str) else tuple(countries)
    if not countries:
        raise ValueError("countries must name at least one country")
    if len(set(countries)) != len(countries):
        raise ValueError(f"countries has duplicates: {sorted({c for c in countries if countries.count(c) > 1})}")
    frame = read_global_opinions(path) if frame is None else frame
    missing = {"question", "selections", "options"} - set(getattr(frame, "columns", ()))
    if missing:
        raise ValueError(f"frame is not a GlobalOpinionQA table: missing columns {sorted(missing)}")
    rows, skipped = [], []
    wanted = {c: g for g, c in enumerate(countries)}
    for qid, rec in enumerate(frame.itertuples(index=False)):
        if not isinstance(rec.question, str) or not rec.question.strip():
            skipped.append({"question_id": qid, "country": None,
                            "reason": "empty question" if isinstance(rec.question, str) else
                            f"question is {type(rec.question).__name__}, not a string"})
            continue
        try:
            options = _parse_options(rec.options)
            selections = _parse_selections(rec.selections)
        except (ValueError, SyntaxError, TypeError) as exc:
            skipped.append({"question_id": qid, "country": None, "reason": f"unparsable: {exc}"})
            continue
        if not options or any(not o.strip() for o in options):
            skipped.append({"question_id": qid, "country": None, "reason": "empty options"})
            continue
        if len(options) > len(LETTERS):
            skipped.append({"question_id": qid, "country": None, "reason": f"{len(options)} options > 26"})
            continue
        for country, probs in selections.items():
            if country not in wanted:
                continue
            try:
                p = np.asarray(probs, dtype=np.float64).reshape(-1) if np.ndim(probs) else None
            except (TypeError, ValueError):
                p = None
            if p is None:
                reason = f"probabilities are not a list ({type(probs).__name__})"
            elif p.shape != (len(options),):
                reason = f"{p.size} probabilities for {len(options)} options"
            elif not np.all(np.isfinite(p)) or np.any(p < 0):
                reason = "negative or non-finite probabilities"
            elif abs(p.sum() - 1.0) > PROB_TOLERANCE:
                reason = f"probabilities sum to {p.sum():.3f}"
            else:
                reason = None
            if reason:
                skipped.append({"question_id": qid, "country": country, "reason": reason})
                continue
            rows.append({"question_id": qid, "question": rec.question, "country": country,
                         "group": wanted[country], "options": options, "probs": p / p.sum(),
                         "prompt": format_prompt(rec.question, options, country, template),
                         "candidates": [answer.format(letter=LETTERS[i], option=o)
                                        for i, o in enumerate(options)]})
    table = pd.DataFrame(rows, columns=["question_id", "question", "country", "group", "options",
                                        "probs", "prompt", "candidates"])
    absent = [c for c in countries if c not in set(table["country"])]
    if absent:
        raise ValueError(f"countries not found in the data: {absent}")
    skipped = pd.DataFrame(skipped, columns=["question_id", "country", "reason"])
    if len(skipped):
        warnings.warn(f"GlobalOpinionQA: skipped {len(skipped)} bad rows/entries "
                      f"(see .skipped): {skipped['reason'].value_counts().head(3).to_dict()}", stacklevel=2)
    table = table.sort_values(["group", "question_id"], kind="stable").reset_index(drop=True)
    return OpinionItems(table=table, countries=countries, skipped=skipped)


def make_pairs(items, seed=0, split=(0.8, 0.1, 0.1), split_by="item"):
    """One preference pair per item, and a train/val/test split within each country.

    chosen = the option with the highest survey probability (ties: the first); rejected = one of
    the other options, uniformly, drawn with ``seed``. ``split_by="item"`` splits each country's
    items 80/10/10 (the paper's protocol); ``split_by="question"`` assigns whole questions to one
    split, so that no question is in train for one country and in test for another.

    Returns a DataFrame with ``item`` (row of ``items.table``), ``group``, ``chosen``,
    ``rejected`` (option indices) and ``split`` ∈ {"train", "val", "test"}.
    """
    split = np.asarray(split, dtype=np.float64)
    if split.shape != (3,) or np.any(split < 0) or not np.isclose(split.sum(), 1.0):
        raise ValueError(f"split must be three non-negative fractions summing to 1, got {tuple(split)}")
    if split_by not in ("item", "question"):
        raise ValueError(f"split_by must be 'item' or 'question', got {split_by!r}")
    table = items.table
    rng = np.random.default_rng(seed)
    n_opts = table["options"].map(len).to_numpy()
    chosen = np.array([int(np.argmax(p)) for p in table["probs"]])
    other = (rng.integers(0, np.maximum(n_opts - 1, 1)))
    rejected = np.where(other >= chosen, other + 1, other)
    labels = np.empty(len(table), dtype=object)

    def assign(index):
        order = rng.permutation(index)
        cut = np.round(np.cumsum(split)[:2] * len(order)).astype(int)
        labels[order[:cut[0]]] = "train"
        labels[order[cut[0]:cut[1]]] = "val"
        labels[order[cut[1]:]] = "test"

    if split_by == "item":
        for g in range(len(items.countries)):
            assign(np.flatnonzero(table["group"].to_numpy() == g))
    else:
        questions = table["question_id"].unique()
        q_labels = np.empty(len(questions), dtype=object)
        order = rng.permutation(len(questions))
        cut = np.round(np.cumsum(split)[:2] * len(order)).astype(int)
        q_labels[order[:cut[0]]], q_labels[order[cut[0]:cut[1]]], q_labels[order[cut[1]:]] = \
            "train", "val", "test"
        labels[:] = pd.Series(q_labels, index=questions).loc[table["question_id"]].to_numpy()
    pairs = pd.DataFrame({"item": np.arange(len(table)), "group": table["group"].to_numpy(),
                          "chosen": chosen, "rejected": rejected, "split": labels})
    return pairs[n_opts >= 2].reset_index(drop=True)


def opinion_pairs(items, seed=0, split=(0.8, 0.1, 0.1), split_by="item", source="GlobalOpinionQA"):
    """GlobalOpinionQA as grouped preference pairs (:class:`llm_head.data.PreferencePairs`): the pairs
    and split of :func:`make_pairs` as text (chosen and rejected answers), the country as the group,
    and every option of a question as a candidate, with the country's survey distribution as the
    target."""
    table = items.table
    pairs = make_pairs(items, seed=seed, split=split, split_by=split_by)
    rows = table.loc[pairs["item"]].reset_index(drop=True)
    chosen = [c[i] for c, i in zip(rows["candidates"], pairs["chosen"])]
    rejected = [c[i] for c, i in zip(rows["candidates"], pairs["rejected"])]
    frame = pd.DataFrame({"prompt": rows["prompt"], "chosen": chosen, "rejected": rejected,
                          "group": rows["country"], "split": pairs["split"].to_numpy(),
                          "question_id": rows["question_id"]})
    sets = {prompt_key(p): (list(c), np.asarray(q, dtype=np.float64))
            for p, c, q in zip(table["prompt"], table["candidates"], table["probs"])}
    skipped = items.skipped.rename(columns={"question_id": "row"}).reindex(columns=["row", "reason"])
    return PreferencePairs(table=frame, groups=tuple(items.countries), skipped=skipped, source=str(source),
                           candidate_sets=sets)
