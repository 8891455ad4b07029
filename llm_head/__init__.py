"""llm_head — group-robust fine-tuning of a frozen LLM's last layer with :mod:`loglinear_grpo`.

Paper §3.1: training only the output layer W of a causal LM makes the policy over a candidate
answer set log-linear in W's rows, so the core solver applies exactly. Pipeline::

    items = load_global_opinions("global_opinions.csv")          # countries = groups
    loaded = load_model("google/gemma-2b")                        # or "smollm2", a folder, a .gguf
    feats = extract_features(loaded, prompts, candidates, cache_dir="cache")
    problem = HeadProblem(feats, make_pairs(items, seed=0), reference_theta(loaded.model, feats), ...)
    result = train(problem, loss="ipo", method="group_robust")
    evaluate(problem, result.theta, loss="ipo")

or ``python -m llm_head {extract,train,evaluate,export}``. torch and transformers are imported
only by the functions that need them (``pip install -e ".[llm]"``).
"""
from .extract import (DEFAULT_MODEL, LoadedModel, extract_features, load_model, prepare_model,
                      smollm2_gguf, time_extraction)
from .features import LastLayerFeatures
from .head import (export_model, head_rows, load_head_delta, reference_theta, save_head_delta,
                   untie_output_layer, write_rows)
from .opinions import PAPER_COUNTRIES, OpinionItems, load_global_opinions, make_pairs
from .train import HeadProblem, alpha_history, evaluate, js_distances, train

__all__ = [
    "DEFAULT_MODEL", "HeadProblem", "LastLayerFeatures", "LoadedModel", "OpinionItems", "PAPER_COUNTRIES",
    "alpha_history", "evaluate", "export_model", "extract_features", "head_rows", "js_distances",
    "load_global_opinions", "load_head_delta", "load_model", "make_pairs", "prepare_model",
    "reference_theta", "save_head_delta", "smollm2_gguf", "time_extraction", "train",
    "untie_output_layer", "write_rows",
]
