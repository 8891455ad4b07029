"""Feature-extraction throughput of llm_head vs a bare forward pass of the same model, and training time.

    python benchmarks/llm_extraction.py [--model smollm2] [--items 64 ...] [--batch-sizes 8 16]
                                        [--device cpu|cuda] [--random-config gemma-2b]
                                        [--out benchmarks/results]

For each batch size: prompts/s of :func:`llm_head.extract_features` (tokenisation, padded
batches, the backbone, gathering the hidden states, copying them to host memory) and of the same
batches through ``model.base_model`` alone, tokenised beforehand (goal: extraction ≥ 80% of the
bare pass). Then, when
``--workdir`` holds extracted features, the seconds to train GR-IPO / IPO on them (full batch).
Best of ``--repeats``; writes ``llm_extraction.csv``.

``--random-config gemma-2b`` times the Gemma-2B architecture (the paper's model: 18 layers,
hidden size 2048, MQA, vocabulary 256 000) with random weights built in place, tokenised by
``--model``'s tokenizer: no download is needed, and the cost of a forward pass does not depend on
the weights' values (only the prompts' token counts, which differ a little from Gemma's tokenizer).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llm_head as lh  # noqa: E402

# Gemma-2B's published configuration (config.json of google/gemma-2b)
RANDOM_CONFIGS = {"gemma-2b": dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                   num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                                   head_dim=256, max_position_embeddings=8192,
                                   hidden_activation="gelu_pytorch_tanh")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "global_opinions_partial.csv"))
    parser.add_argument("--items", type=int, nargs="+", default=[64],
                        help="prompts per timing (several values: one timing each)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--device")
    parser.add_argument("--shard-items", type=int, default=lh.extract.DEFAULT_SHARD_ITEMS)
    parser.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                        help="time this architecture with random weights (tokenizer of --model)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "results", "llm"))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--train-only", action="store_true", help="only time training on cached features")
    parser.add_argument("--extract-only", action="store_true", help="do not time training")
    parser.add_argument("--plot-from", nargs="+", metavar="CSV",
                        help="only draw extraction.png from llm_extraction.csv files of earlier runs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.plot_from:
        plot_throughput(pd.concat([pd.read_csv(p) for p in args.plot_from]), os.path.join(args.out, "extraction.png"))
        return 0
    rows = []
    if not args.train_only:
        rows += time_extraction_rows(args)
    if not args.extract_only:
        rows += time_training_rows(args)
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(args.out, "llm_extraction.csv"), index=False)
    if "extract_prompts_per_s" in table:
        plot_throughput(table, os.path.join(args.out, "extraction.png"))
    return 0


def plot_throughput(table, path):
    """Prompts/s of the extraction and of the bare pass vs batch size, one panel per model × prompt count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = table[table["what"] == "extraction"]
    panels = list(table.groupby(["model", "prompts"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    for ax, ((model, n), t) in zip(axes[0], panels):
        x = np.arange(len(t))
        ax.bar(x - 0.2, t["bare_prompts_per_s"], 0.4, label="bare forward pass", color="0.6")
        ax.bar(x + 0.2, t["extract_prompts_per_s"], 0.4, label="llm_head extraction", color="C0")
        for xi, (ratio, top) in enumerate(zip(t["ratio"], t[["bare_prompts_per_s", "extract_prompts_per_s"]].max(axis=1))):
            ax.text(xi, top, f"{100 * ratio:.0f}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [str(b) for b in t["batch_size"]])
        ax.set_xlabel("batch size")
        ax.margins(y=0.12)
        ax.set_title(f"{model}\n{n} prompts, {t['device'].iloc[0]}", fontsize=8)
    axes[0, 0].set_ylabel("prompts / s")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def time_extraction_rows(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = lh.load_global_opinions(args.data)
    tic = time.perf_counter()
    loaded = load_random(args) if args.random_config else lh.load_model(args.model, device=args.device)
    load_s = time.perf_counter() - tic
    import torch
    device = str(loaded.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    model_name = f"{args.random_config} (random weights)" if args.random_config else args.model
    print(f"{model_name} on {name}, dtype {loaded.spec['dtype']}, loaded in {load_s:.1f} s")
    rows = []
    for n_items in args.items:
        # more prompts than the data has (a long run over several shards): drawn with replacement
        table = items.table.sample(n=n_items, random_state=0, replace=n_items > len(items))
        prompts, candidates = table["prompt"].tolist(), table["candidates"].tolist()
        lh.time_extraction(loaded, prompts[:8], candidates[:8], batch_size=8, repeats=1)      # warm-up
        for bs in args.batch_sizes:
            r = lh.time_extraction(loaded, prompts, candidates, batch_size=bs, repeats=args.repeats,
                                   shard_items=args.shard_items)
            rows.append({"what": "extraction", "model": model_name, "device": name, "batch_size": bs, **r})
            print(f"{n_items:5d} prompts, batch {bs:3d}: extraction {r['extract_prompts_per_s']:8.1f} prompts/s, "
                  f"bare forward {r['bare_prompts_per_s']:8.1f} prompts/s -> {100 * r['ratio']:.0f}% of the bare pass")
    return rows


def load_random(args):
    """A randomly initialised model of ``RANDOM_CONFIGS[args.random_config]``, built on the device."""
    import torch
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM
    from llm_head.extract import default_device, resolve_dtype, resolve_model_id
    name, gguf_file = resolve_model_id(args.model)
    tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))
    device = args.device or default_device()
    dtype = resolve_dtype(device)
    config = GemmaConfig(**RANDOM_CONFIGS[args.random_config])
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer of {args.model} has more tokens than {args.random_config}'s vocabulary")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return lh.prepare_model(model, tokenizer, device, dtype, spec={"model": f"random {args.random_config}"})


def time_training_rows(args):
    rows = []
    if os.path.exists(os.path.join(args.workdir, "features.safetensors")):
        from llm_head.workdir import load_problem
        problem, _ = load_problem(args.workdir, seed=0)
        for method in ("group_robust", "vanilla"):
            for estimator, steps in (("full", 1000), ("stochastic", 5000), ("closed_form", 100)):
                tic = time.perf_counter()
                lh.train(problem, "ipo", method=method, estimator=estimator, steps=steps, radius=0.2,
                         step_size="0.01/sqrt(t)" if estimator == "stochastic" else None, alpha_step_size=0.01,
                         log_every=steps, tol=None)
                sec = time.perf_counter() - tic
                data = problem.data("train")
                rows.append({"what": "training", "model": args.model, "device": "CPU", "method": method,
                             "estimator": estimator, "steps": steps, "seconds": sec, "pairs": data.n_samples,
                             "dim": data.dim})
                print(f"train {method:12s} {estimator:11s} {steps:5d} steps on {data.n_samples} pairs, "
                      f"dim θ = {data.dim}: {sec:.2f} s")
    return rows


if __name__ == "__main__":
    sys.exit(main())
