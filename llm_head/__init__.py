"""llm_head — group-robust fine-tuning of a frozen LLM's last layer with :mod:`loglinear_grpo`.

Paper §3.1: training only the output layer W of a causal LM makes the policy over a candidate
answer set log-linear in W's rows, so the core solver applies exactly. Pipeline::

    pairs = load_preference_pairs("pairs.jsonl")                  # TRL's formats + a group column
    items = items_from_pairs(pairs)                               # distinct prompts, their candidates
    loaded = load_model("google/gemma-2b")                        # or "smollm2", a folder, a .gguf
    feats = extract_features(loaded, list(items.prompt), list(items.candidates), cache_dir="cache")
    problem = HeadProblem(feats, pair_indices(pairs.table, items, pairs.groups, pairs.union).assign(
        split=assign_splits(pairs, seed=0)), reference_theta(loaded.model, feats), list(pairs.groups))
    result = train(problem, loss="sigmoid", method="group_robust")     # certified: result.gap
    evaluate(problem, result.theta, loss="sigmoid")

:func:`select_head` chooses R (and C) on the validation split; :func:`compare_methods` asks "did GR
help the worst group?" on the test split over seeds (reference vs vanilla vs GR, paired intervals);
or ``python -m llm_head {extract,train,select,compare,evaluate,export}``, which keeps all of it in a work folder
(:mod:`llm_head.workdir`); :func:`extract_to_workdir` is ``extract`` from Python, for any data source
(a ``datasets.Dataset`` or DataFrame too). torch and transformers are imported only by the functions that need them
(``pip install -e ".[llm]"``).
"""
from .data import (PreferencePairs, assign_splits, items_from_pairs, load_preference_pairs, pair_indices,
                   pairs_from_frame)
from .extract import (DEFAULT_MODEL, LoadedModel, Rendering, extract_features, load_model, prepare_model,
                      smollm2_gguf, time_extraction)
from .features import LastLayerFeatures, PairDifferenceOperator, pair_rows
from .head import (export_model, head_rows, load_head_delta, reference_theta, save_head_delta,
                   untie_output_layer, write_rows)
from .opinions import PAPER_COUNTRIES, OpinionItems, load_global_opinions, make_pairs, opinion_pairs
from .train import HeadProblem, alpha_history, evaluate, js_distances, train
from .workdir import load_problem
from .select import CRITERIA, DEFAULT_ADJUSTMENTS, DEFAULT_RADII, Selection, select_head
from .compare import Comparison, compare_methods



def extract_to_workdir(data, workdir, **options):
    """``python -m llm_head extract`` from Python: the features of ``data`` into the work folder
    ``workdir``, ready for ``python -m llm_head train --workdir workdir`` (or :func:`load_problem`).

    Parameters
    ----------
    data : path, str, datasets.Dataset, datasets.DatasetDict or DataFrame
        Anything :func:`load_preference_pairs` reads: a file, a ``save_to_disk`` folder, a hub id, or
        an object in memory (a ``datasets.Dataset`` is read with its own column types; a
        ``DatasetDict`` with several splits gives them as the split).
    workdir : path
        The work folder.
    **options
        The extract command's flags, by their argument names (``model="smollm2"``,
        ``group_column="country"``, ``split_by="question_id"``, ``limit=20``, ``strict=True``,
        ``device="cpu"``, ``force=True``, …), with the command's defaults.

    Returns 0; raises ``ValueError`` as the command reports errors.
    """
    from .__main__ import build_parser, cmd_extract
    args = build_parser().parse_args(["extract", "--workdir", str(workdir)])
    unknown = sorted(set(options) - set(vars(args)) | ({"command", "config", "data", "workdir"} & set(options)))
    if unknown:
        raise TypeError(f"extract_to_workdir: unknown option(s) {unknown}; see python -m llm_head extract --help")
    for key, value in options.items():
        setattr(args, key, value)
    args.data = data
    return cmd_extract(args)


__all__ = [
    "CRITERIA", "Comparison", "DEFAULT_ADJUSTMENTS", "DEFAULT_MODEL", "DEFAULT_RADII", "HeadProblem", "Selection",
    "compare_methods", "select_head", "LastLayerFeatures", "LoadedModel", "OpinionItems", "PAPER_COUNTRIES",
    "PairDifferenceOperator", "PreferencePairs", "Rendering", "alpha_history", "assign_splits", "evaluate", "export_model",
    "extract_features", "extract_to_workdir", "head_rows", "items_from_pairs", "js_distances", "load_global_opinions",
    "load_head_delta", "load_model", "load_preference_pairs", "load_problem", "make_pairs", "opinion_pairs",
    "pair_indices", "pair_rows", "pairs_from_frame", "prepare_model", "reference_theta", "save_head_delta", "smollm2_gguf",
    "time_extraction", "train", "untie_output_layer", "write_rows",
]
