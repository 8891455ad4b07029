"""Feature-extraction throughput of llm_head vs a bare forward pass of the same model, and training time.

    python benchmarks/llm_extraction.py [--model smollm2] [--items 64] [--batch-sizes 8 16]
                                        [--device cpu|cuda] [--out benchmarks/results]

For each batch size: prompts/s of :func:`llm_head.extract_features` (tokenisation, padded
batches, the backbone, gathering the hidden states, copying them to host memory) and of the same
batches through ``model.base_model`` alone (goal: extraction ≥ 80% of the bare pass). Then, when
``--workdir`` holds extracted features, the seconds to train GR-IPO / IPO on them (full batch).
Best of ``--repeats``; writes ``llm_extraction.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llm_head as lh  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "global_opinions_partial.csv"))
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--device")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(ROOT, "results", "llm"))
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--train-only", action="store_true", help="only time training on cached features")
    args = parser.parse_args(argv)
    rows = []
    if not args.train_only:
        rows += time_extraction_rows(args)
    rows += time_training_rows(args)
    os.makedirs(args.out, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(args.out, "llm_extraction.csv"), index=False)
    return 0


def time_extraction_rows(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = lh.load_global_opinions(args.data)
    table = items.table.sample(n=min(args.items, len(items)), random_state=0)
    prompts, candidates = table["prompt"].tolist(), table["candidates"].tolist()
    tic = time.perf_counter()
    loaded = lh.load_model(args.model, device=args.device)
    load_s = time.perf_counter() - tic
    import torch
    device = str(loaded.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} on {name}, dtype {loaded.spec['dtype']}, loaded in {load_s:.1f} s; {len(prompts)} prompts")
    lh.time_extraction(loaded, prompts[:8], candidates[:8], batch_size=8, repeats=1)      # warm-up
    rows = []
    for bs in args.batch_sizes:
        r = lh.time_extraction(loaded, prompts, candidates, batch_size=bs, repeats=args.repeats)
        rows.append({"what": "extraction", "model": args.model, "device": name, "batch_size": bs, **r})
        print(f"batch {bs:3d}: extraction {r['extract_prompts_per_s']:8.1f} prompts/s, bare forward "
              f"{r['bare_prompts_per_s']:8.1f} prompts/s -> {100 * r['ratio']:.0f}% of the bare pass")
    return rows


def time_training_rows(args):
    rows = []
    if os.path.exists(os.path.join(args.workdir, "features.safetensors")):
        from llm_head.__main__ import load_problem
        problem, _ = load_problem(args.workdir, seed=0)
        for method in ("group_robust", "vanilla"):
            for estimator, steps in (("full", 1000), ("stochastic", 5000), ("closed_form", 100)):
                tic = time.perf_counter()
                lh.train(problem, "ipo", method=method, estimator=estimator, steps=steps, radius=0.2,
                         step_size="0.01/sqrt(t)" if estimator == "stochastic" else None, alpha_step_size=0.01,
                         log_every=steps)
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
