"""The implicit S's products on torch (gather / ``index_add_``) against numpy (BLAS per token column).

    python benchmarks/torch_products.py [--pairs 10000] [--length 8] [--hidden-size 2048] [--vocab 8000]
        [--repeats 3] [--threads 1] [--devices cpu cuda] [--cache-dir /tmp/lg_scale_cache]
        [--out paper_figures/performance] [--quick]

The cache is ``benchmarks/scale.py``'s (its helpers, by import): random float16 hidden states,
memory-mapped, ``pairs`` pairs of two answers of L tokens, one hidden state of size d_h per answer
token, tokens uniform over |V′| ids, so θ ∈ R^{|V′|·d_h}. S is
``llm_head.features.PairDifferenceOperator`` with ``backend="numpy"`` and ``backend="torch"`` (on the
CPU, and on cuda when ``torch.cuda.is_available()``). For each, the median over ``--repeats`` passes
(after one warm-up pass, so the cache pages are in memory) of S x and Sᵀ u in float64 (the exact
products) and float32 (``approximate_products``), passes per second, and the largest relative error
max|y − y₆₄| / max|y₆₄| against numpy float64. Torch and BLAS run on ``--threads`` threads.

Prints the table and writes ``torch_products.csv`` and ``torch_products.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def _set_threads(argv):
    """BLAS reads its thread count when numpy is first imported: set it before that."""
    threads = "1"
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(key, threads)


if __name__ == "__main__":
    _set_threads(sys.argv[1:])

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def timed(fn, arg, repeats, sync=None):
    """(median seconds, last result) of ``repeats`` calls after one warm-up call."""
    out = fn(arg)
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        out = fn(arg)
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def relative_error(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(float).tiny))


def operators(features, chosen, rejected, devices):
    """(backend, device, operator) for numpy and torch on each available device."""
    from llm_head.features import PairDifferenceOperator, torch_available
    yield "numpy", "cpu", PairDifferenceOperator(features, chosen, rejected, backend="numpy")
    if not torch_available():
        print("  torch is not importable: numpy only")
        return
    import torch
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"  {device}: torch.cuda.is_available() is False, skipped")
            continue
        yield "torch", device, PairDifferenceOperator(features, chosen, rejected, backend="torch", device=device)


def measure(features, chosen, rejected, args):
    rows, reference = [], {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(features.dim) * 1e-2
    u = rng.standard_normal(chosen.size)
    for backend, device, op in operators(features, chosen, rejected, args.devices):
        sync = None
        if device.startswith("cuda"):
            import torch
            sync = torch.cuda.synchronize
        fast_mv, fast_rmv = op.approximate_products()
        for precision, products in (("float64", (op.matvec, op.rmatvec)), ("float32", (fast_mv, fast_rmv))):
            for name, fn, arg in (("matvec", products[0], x), ("rmatvec", products[1], u)):
                seconds, out = timed(fn, arg, args.repeats, sync)
                key = name
                if backend == "numpy" and precision == "float64":
                    reference[key] = out
                row = {"backend": backend, "device": device, "precision": precision, "product": name,
                       "seconds": seconds, "ms": 1e3 * seconds, "passes_per_s": 1.0 / seconds,
                       "rel_error_vs_numpy64": relative_error(out, reference[key])}
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
                rows.append(row)
        del op
    return pd.DataFrame(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=10_000)
    p.add_argument("--length", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                   help="torch devices (cuda is skipped when not available)")
    p.add_argument("--cache-dir", default="/tmp/lg_scale_cache", help="where the random caches are written")
    p.add_argument("--quick", action="store_true", help="N = 1000, d_h = 256, |V'| = 1000 (a smoke run)")
    p.add_argument("--out", default=os.path.join(ROOT, "paper_figures", "performance"))
    p.add_argument("--name", default="torch_products", help="output file stem")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.hidden_size, args.vocab = 1000, 256, 1000
    from implicit_features import load_features
    from scale import ensure_cache, markdown
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    folder = ensure_cache(args, args.pairs)
    features, chosen, rejected = load_features(folder, args.pairs, args.length, args.hidden_size)
    print(f"N = {args.pairs:,} pairs, L = {args.length}, d_h = {args.hidden_size}, |V'| = {features.vocab.size:,}, "
          f"d = {features.dim:,}; cache {features.hidden.nbytes / 2**30:.2f} GiB float16; {args.threads} thread(s)")
    table = measure(features, chosen, rejected, args)
    for key, value in (("pairs", args.pairs), ("length", args.length), ("hidden_size", args.hidden_size),
                       ("vocab", int(features.vocab.size)), ("threads", args.threads)):
        table[key] = value
    os.makedirs(args.out, exist_ok=True)
    table.to_csv(os.path.join(args.out, f"{args.name}.csv"), index=False)
    columns = ["backend", "device", "precision", "product", "ms", "passes_per_s", "rel_error_vs_numpy64"]
    text = markdown(table, columns)
    command = "python benchmarks/torch_products.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(f"`{command.strip()}`\n\nN = {args.pairs:,}, L = {args.length}, d_h = {args.hidden_size}, "
                 f"|V'| = {features.vocab.size:,}, float16 cache, {args.threads} thread(s); median of "
                 f"{args.repeats} passes\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
