"""Check llm_head's features on another device or dtype (the GPU path: bf16, ``cuda``) against a reference.

    python benchmarks/llm_device_check.py --reference results/llm [--model smollm2] [--device cuda]
                                          [--dtype bfloat16] [--save results/llm_gpu] [--rtol 0.05]

The reference is a work folder written by ``python -m llm_head extract`` (here: float32 on the
CPU). The same items are extracted again with ``--model`` on ``--device`` (default: cuda when
available, in its default dtype) and compared:

* hidden states: ‖H − H_ref‖_F / ‖H_ref‖_F, the median and largest per-row relative error;
* θ_ref (the model's own output rows, rounded to the device dtype);
* the reference policy over each item's candidates, log π_ref(y|x): largest |Δ log π| and the share
  of items whose most likely answer is the same;
* right- vs left-padded batches on the device (they must agree up to the dtype's rounding).

``--save`` writes the new features as a work folder, so that the whole Figure-5 run can be
repeated on them (``paper_figures/global_opinions.py --workdir``). Exits 1 when the relative
error of the hidden states exceeds ``--rtol``. Writes ``llm_device_check.csv`` to ``--out``.

Then (skipped with ``--no-products``; alone with ``--products-only``, which needs no model or
reference) the implicit S on torch (``PairDifferenceOperator(backend="torch")``) over a random
memory-mapped float16 cache (``benchmarks/implicit_features.py``'s; ``--products-pairs`` pairs of
``--products-length`` tokens, d_h = ``--products-hidden``, |V′| = ``--products-vocab``): the time of
S x and Sᵀ u in float64 and float32 on cuda and on the CPU (passes/s, relative error against numpy
float64), and one certified ``newton_cg`` GR-DPO solve (ball of radius 1) with the cuda operator,
its value against the numpy operator's when ``--products-compare`` (the CPU solve is slow). Without
cuda the cuda parts are skipped and the solve runs on the CPU torch operator. Writes
``llm_device_products.csv`` to ``--out``; exits 1 when a float64 product differs from numpy's by more
than 1e-10 relative or the solve is not certified.

    python benchmarks/llm_device_check.py --products-only [--products-pairs 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import llm_head as lh  # noqa: E402
from llm_head import workdir as wd  # noqa: E402


def relative_errors(a, b):
    """Frobenius relative error of ``a`` against ``b``, and the per-row relative errors."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rows = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), np.finfo(float).tiny)
    return np.linalg.norm(a - b) / np.linalg.norm(b), rows


def compare_policies(features, theta, features_ref, theta_ref):
    """Largest |Δ log π| over all candidates, and the share of items with the same most likely answer."""
    logp, logp_ref = features.candidate_log_probs(theta), features_ref.candidate_log_probs(theta_ref)
    owner = np.repeat(np.arange(features.n_items), np.diff(features.candidate_offsets))
    starts = features.candidate_offsets[:-1]
    top = np.lexsort((-logp, owner))[starts]            # per item, its most likely candidate
    top_ref = np.lexsort((-logp_ref, owner))[starts]
    return np.max(np.abs(logp - logp_ref)), np.mean(top == top_ref)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.path.join(ROOT, "results", "llm"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="check only the first N items of the reference")
    parser.add_argument("--padding-items", type=int, default=256, help="items for the left/right padding check")
    parser.add_argument("--rtol", type=float, default=0.05)
    parser.add_argument("--save", help="write the new features as a work folder here")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--products-only", action="store_true",
                        help="only the torch products and solve on a random cache (no model, no reference)")
    parser.add_argument("--no-products", action="store_true", help="skip the torch products and solve")
    parser.add_argument("--products-pairs", type=int, default=2000)
    parser.add_argument("--products-length", type=int, default=8)
    parser.add_argument("--products-hidden", type=int, default=2048)
    parser.add_argument("--products-vocab", type=int, default=8000)
    parser.add_argument("--products-repeats", type=int, default=3)
    parser.add_argument("--products-compare", action="store_true",
                        help="also solve with the numpy operator and compare the values")
    args = parser.parse_args(argv)
    if args.save and args.limit:
        parser.error("--save needs every item: drop --limit")
    if args.products_only:
        return products_check(args)
    status = extraction_check(args)
    if not args.no_products:
        status = max(status, products_check(args))
    return status


def extraction_check(args):
    """The features extracted on ``--device`` against the reference work folder (0 when within rtol)."""

    import torch
    all_features, all_theta, record, ref_spec, _ = wd.load_workdir(args.reference)
    ref_features = all_features
    items = wd.items_table(record)
    rendering = lh.Rendering(**record["rendering"])
    prompts, candidates = items["prompt"].tolist(), items["candidates"].tolist()
    if args.limit:
        prompts, candidates = prompts[:args.limit], candidates[:args.limit]
        ref_features = ref_features.first_items(len(prompts))
    loaded = lh.load_model(args.model, device=args.device, dtype=args.dtype)
    device = str(loaded.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"{args.model} on {name} ({loaded.spec['dtype']}) vs the reference {args.reference} "
          f"({ref_spec.get('model')}, {ref_spec.get('dtype')}); {len(prompts)} items")
    if ref_spec.get("tokenizer") not in (None, loaded.spec["tokenizer"]):
        raise SystemExit("the reference was extracted with another tokenizer")

    lh.extract_features(loaded, prompts[:16], candidates[:16], batch_size=args.batch_size, progress=False,
                        rendering=rendering)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tic = time.perf_counter()
    features = lh.extract_features(loaded, prompts, candidates, batch_size=args.batch_size, progress=False,
                                   rendering=rendering)
    seconds = time.perf_counter() - tic
    for key in ("entry_candidate", "entry_token", "entry_hidden", "candidate_offsets"):
        if not np.array_equal(getattr(features, key), getattr(ref_features, key)):
            raise SystemExit(f"{key} differs from the reference: not the same items or tokenizer")
    theta_all = lh.reference_theta(loaded.model, all_features)
    theta_err, _ = relative_errors(theta_all, all_theta)
    keep = np.searchsorted(all_features.vocab, features.vocab)   # θ of the checked items' tokens V′
    rows_of = lambda t: t.reshape(all_features.vocab.size, -1)[keep].ravel()  # noqa: E731
    theta, ref_theta = rows_of(theta_all), rows_of(all_theta)
    hidden_err, hidden_rows = relative_errors(features.hidden, ref_features.hidden)
    dlogp, same_top = compare_policies(features, theta, ref_features, ref_theta)

    m = min(args.padding_items, len(prompts))
    left = lh.extract_features(loaded, prompts[:m], candidates[:m], batch_size=args.batch_size,
                               padding_side="left", progress=False, rendering=rendering)
    pad_err, pad_rows = relative_errors(left.hidden, features.hidden[:left.hidden.shape[0]])

    rows = [("items extracted", len(prompts)), ("extraction seconds (all items)", seconds),
            ("prompts per second", len(prompts) / seconds),
            ("hidden: relative error (Frobenius)", hidden_err),
            ("hidden: median row relative error", np.median(hidden_rows)),
            ("hidden: largest row relative error", np.max(hidden_rows)),
            ("theta_ref: relative error", theta_err),
            ("log pi_ref: largest absolute difference", dlogp),
            ("most likely answer: share of items that agree", same_top),
            (f"left vs right padding ({m} items): relative error", pad_err),
            ("left vs right padding: largest row relative error", np.max(pad_rows))]
    table = pd.DataFrame(rows, columns=["check", "value"])
    table.insert(0, "device", f"{name} ({loaded.spec['dtype']})")
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "llm_device_check.csv"), index=False)
    print(table[["check", "value"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.save:
        wd.save_workdir(args.save, features, theta_all, record, loaded.spec)
        print(f"features -> {args.save}")
    if hidden_err > args.rtol or pad_err > args.rtol:
        print(f"FAILED: a relative error exceeds rtol={args.rtol}")
        return 1
    return 0


def products_check(args):
    """The implicit S on torch: products on cuda and CPU, and one certified newton_cg solve (0 when the
    float64 products agree with numpy's and the solve is certified)."""
    import tempfile
    import warnings

    import torch

    import loglinear_grpo as lg
    from llm_head.features import PairDifferenceOperator

    sys.path.insert(0, HERE)
    from implicit_features import load_features, make_cache
    from torch_products import relative_error, timed

    has_cuda = torch.cuda.is_available()
    n, length, hidden, vocab = args.products_pairs, args.products_length, args.products_hidden, args.products_vocab
    cache_bytes = 2 * n * length * hidden * 2
    print(f"\nimplicit S on torch: N = {n:,} pairs, L = {length}, d_h = {hidden}, |V'| <= {vocab:,}; "
          f"float16 cache {cache_bytes / 2**30:.2f} GiB, theta {vocab * hidden * 8 / 2**30:.2f} GiB (float64); "
          f"cuda: {torch.cuda.get_device_name() if has_cuda else 'not available (cuda parts skipped)'}")
    rows, status = [], 0
    with tempfile.TemporaryDirectory() as folder:
        make_cache(folder, n, length, hidden, vocab, seed=n)
        features, chosen, rejected = load_features(folder, n, length, hidden)
        rng = np.random.default_rng(0)
        x, u = 1e-2 * rng.standard_normal(features.dim), rng.standard_normal(n)
        reference = PairDifferenceOperator(features, chosen, rejected, backend="numpy")
        exact = {"matvec": reference.matvec(x), "rmatvec": reference.rmatvec(u)}
        ops = [("numpy", "cpu", reference), ("torch", "cpu", PairDifferenceOperator(features, chosen, rejected,
                                                                                    backend="torch"))]
        if has_cuda:
            ops.append(("torch", "cuda", PairDifferenceOperator(features, chosen, rejected, device="cuda")))
        for backend, device, op in ops:
            sync = torch.cuda.synchronize if device == "cuda" else None
            fast_mv, fast_rmv = op.approximate_products()
            for precision, (mv, rmv) in (("float64", (op.matvec, op.rmatvec)), ("float32", (fast_mv, fast_rmv))):
                for name, fn, arg in (("matvec", mv, x), ("rmatvec", rmv, u)):
                    seconds, out = timed(fn, arg, args.products_repeats, sync)
                    err = relative_error(out, exact[name])
                    if precision == "float64" and err > 1e-10:
                        status = 1
                    rows.append({"check": f"{backend} {device} {precision} {name}", "seconds": seconds,
                                 "passes_per_s": 1 / seconds, "rel_error_vs_numpy64": err})
        groups = rng.choice(3, n, p=[0.6, 0.3, 0.1])
        groups[:3] = np.arange(3)
        ref_margin = rng.normal(size=n)
        solve_op = ops[-1][2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tic = time.perf_counter()
            res = lg.solve(lg.PreferenceData(solve_op, groups, ref_margin), loss="dpo", radius=1.0,
                           estimator="newton_cg", progress=False)
            seconds = time.perf_counter() - tic
        if not (res.converged and res.relative_gap <= 1e-6):
            status = 1
        rows.append({"check": f"newton_cg solve, torch {ops[-1][1]}: seconds", "seconds": seconds,
                     "passes_per_s": res.passes / seconds})
        solved = [("certified gap", res.gap), ("relative gap", res.relative_gap), ("value", res.value),
                  ("passes", res.passes), ("converged", float(res.converged))]
        if args.products_compare:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = lg.solve(lg.PreferenceData(reference, groups, ref_margin), loss="dpo", radius=1.0,
                                estimator="newton_cg", progress=False)
            solved.append(("|value - numpy value|", abs(res.value - base.value)))
            if abs(res.value - base.value) > res.gap + base.gap + 1e-12 * max(1.0, abs(base.value)):
                status = 1                        # both certified: each value is within its gap of the optimum
        rows += [{"check": f"newton_cg solve, torch {ops[-1][1]}: {k}", "value": v} for k, v in solved]
    table = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, "llm_device_products.csv"), index=False)
    print(table.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    if status:
        print("FAILED: a float64 product differs from numpy's, or the solve is not certified")
    return status


if __name__ == "__main__":
    sys.exit(main())
