"""``python -m llm_head {extract,train,evaluate,export}`` — GlobalOpinionQA end to end.

    python -m llm_head extract  --data global_opinions.csv --model smollm2 --workdir results/llm
    python -m llm_head train    --workdir results/llm --loss ipo --method group_robust --seed 0
    python -m llm_head evaluate --workdir results/llm --run ipo-group_robust-seed0
    python -m llm_head export   --workdir results/llm --run ipo-group_robust-seed0 --model smollm2

Every flag can also come from a TOML file (``--config settings.toml``; keys are the flag names
with underscores, either at the top level or in a ``[extract]``/``[train]``/… table); flags given
on the command line win. ``extract`` under ``torchrun --nproc_per_node N -m llm_head extract …``
splits the cache shards over the N processes (gloo on CPU, NCCL on GPU).

Work folder: ``features.safetensors`` (the merged features and θ_ref), ``items.json`` (one row per
question × country) and ``runs/<run>/`` (``theta.npy``, ``history.csv``, ``settings.json``,
``metrics_<split>.csv``, ``groups.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

import numpy as np
import pandas as pd

from . import extract as ex
from .features import LastLayerFeatures
from .head import export_model, reference_theta
from .opinions import DEFAULT_TEMPLATE, PAPER_COUNTRIES, load_global_opinions, make_pairs
from .train import HeadProblem, alpha_history, evaluate, train


def _common(p):
    p.add_argument("--config", help="TOML settings file (flags override it)")
    p.add_argument("--workdir", default="results/llm", help="folder for features and runs")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m llm_head", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="frozen-LLM features of every question × country (cached)")
    _common(p)
    p.add_argument("--data", help="global_opinions.csv (default: the hub dataset Anthropic/llm_global_opinions)")
    p.add_argument("--model", default=ex.DEFAULT_MODEL, help="hub id, local folder, .gguf file or 'smollm2'")
    p.add_argument("--revision")
    p.add_argument("--gguf-file")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--countries", nargs="+", default=list(PAPER_COUNTRIES))
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--limit", type=int, help="use only the first N items per country")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-items", type=int, default=ex.DEFAULT_SHARD_ITEMS,
                   help="items per cache shard: the unit of resumption and of work per rank")
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    p.add_argument("--cache-dir", help="default: <workdir>/cache")

    p = sub.add_parser("train", help="fit the output rows with loglinear_grpo.solve")
    _common(p)
    p.add_argument("--loss", choices=("ipo", "dpo", "sigmoid", "hinge"), default="ipo",
                   help="TRL's names: 'sigmoid' is DPO")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--method", choices=("group_robust", "importance_sampling", "vanilla"), default="group_robust")
    p.add_argument("--estimator", choices=("auto", "newton", "full", "stochastic", "closed_form"), default="auto",
                   help="'auto' = 'newton': the certified second-order solver")
    p.add_argument("--steps", type=int, default=None, help="iteration budget (default: the estimator's)")
    p.add_argument("--tol", type=float, default=1e-6,
                   help="stop at this relative certified duality gap (0 or less: run all steps)")
    p.add_argument("--radius", type=float, default=1.0, help="Θ = L2 ball of this radius around θ_ref")
    p.add_argument("--step-size", default=None,
                   help="first-order estimators only: number, 'theory' or 'c/sqrt(t)' (default: 1/L)")
    p.add_argument("--alpha-step-size", default=None, help="first-order estimators only")
    p.add_argument("--chi", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="pairs, split and sampler seed")
    p.add_argument("--split-by", choices=("item", "question"), default="item")
    p.add_argument("--run", help="run name (default: <loss>-<method>-seed<seed>)")

    p = sub.add_parser("evaluate", help="per-country metrics of a run on a split, CSV + figure")
    _common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--split", choices=("train", "val", "test"), default="test")

    p = sub.add_parser("export", help="write a run's rows into the model's (untied) output layer")
    _common(p)
    p.add_argument("--run", required=True)
    p.add_argument("--model", default=ex.DEFAULT_MODEL)
    p.add_argument("--revision")
    p.add_argument("--gguf-file")
    p.add_argument("--out", help="default: <workdir>/runs/<run>/model")
    p.add_argument("--delta-only", action="store_true", help="write head_delta.safetensors only")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        with open(args.config, "rb") as fh:
            settings = tomllib.load(fh)
        flat = {k: v for k, v in settings.items() if not isinstance(v, dict)}
        flat.update(settings.get(args.command, {}))
        sub = parser._subparsers._group_actions[0].choices[args.command]
        known = {a.dest for a in sub._actions}
        unknown = set(flat) - known
        if unknown:
            parser.error(f"{args.config}: unknown settings {sorted(unknown)} for '{args.command}'")
        sub.set_defaults(**flat)
        args = parser.parse_args(argv)
    return args


# ============================================================================ work folder
def _paths(workdir):
    return {"features": os.path.join(workdir, "features.safetensors"),
            "items": os.path.join(workdir, "items.json"), "runs": os.path.join(workdir, "runs")}


def save_workdir(workdir, features, theta_ref, items, spec):
    from safetensors.numpy import save_file
    os.makedirs(workdir, exist_ok=True)
    paths = _paths(workdir)
    tensors = dict(features.arrays(), theta_ref=theta_ref)
    save_file(tensors, paths["features"], metadata={"model": json.dumps(spec)})
    table = items.table.assign(probs=items.table["probs"].map(list))
    with open(paths["items"], "w") as fh:
        json.dump({"countries": list(items.countries), "items": table.to_dict(orient="records")}, fh)


def load_workdir(workdir):
    """(features, θ_ref, items, model spec) of a work folder written by ``extract``."""
    from safetensors import safe_open
    from .opinions import OpinionItems
    paths = _paths(workdir)
    if not os.path.exists(paths["features"]):
        raise FileNotFoundError(f"{paths['features']} not found: run `python -m llm_head extract` first")
    with safe_open(paths["features"], framework="numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        spec = json.loads((fh.metadata() or {}).get("model", "{}"))
    with open(paths["items"]) as fh:
        saved = json.load(fh)
    items = OpinionItems(table=pd.DataFrame(saved["items"]), countries=tuple(saved["countries"]),
                         skipped=pd.DataFrame())
    return LastLayerFeatures.from_arrays(tensors), tensors["theta_ref"], items, spec


def load_problem(workdir, seed=0, split_by="item"):
    """The :class:`HeadProblem` of a work folder written by ``extract``, and its items."""
    features, theta_ref, items, _ = load_workdir(workdir)
    pairs = make_pairs(items, seed=seed, split_by=split_by)
    return HeadProblem(features, pairs, theta_ref, list(items.countries),
                       item_probs=list(items.table["probs"])), items


# ============================================================================ commands
def cmd_extract(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available() and args.device is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    items = load_global_opinions(args.data, countries=args.countries, template=args.template)
    if args.limit:
        items.table = items.table.groupby("group", sort=False).head(args.limit).reset_index(drop=True)
    sizes = {c: int(n) for c, n in zip(items.countries, items.group_sizes())}
    print(f"{len(items)} items, per country: {sizes}; "
          f"skipped {len(items.skipped)}")
    loaded = ex.load_model(args.model, revision=args.revision, gguf_file=args.gguf_file, device=args.device,
                           dtype=args.dtype)
    features = ex.extract_features(loaded, items.table["prompt"].tolist(), items.table["candidates"].tolist(),
                                   cache_dir=args.cache_dir or os.path.join(args.workdir, "cache"),
                                   template=args.template, batch_size=args.batch_size,
                                   shard_items=args.shard_items, padding_side=args.padding_side)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        save_workdir(args.workdir, features, reference_theta(loaded.model, features), items, loaded.spec)
        print(f"features: {features.hidden.shape[0]} hidden states of size {features.hidden_size}, "
              f"|V'| = {features.vocab.size}, dim θ = {features.dim} -> {args.workdir}")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _run_dir(args):
    return os.path.join(_paths(args.workdir)["runs"], args.run)


def _step(value):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def cmd_train(args):
    problem, _ = load_problem(args.workdir, seed=args.seed, split_by=args.split_by)
    args.run = args.run or f"{args.loss}-{args.method}-seed{args.seed}"
    result = train(problem, loss=args.loss, beta=args.beta, method=args.method, estimator=args.estimator,
                   steps=args.steps, tol=args.tol if args.tol and args.tol > 0 else None, radius=args.radius,
                   step_size=_step(args.step_size), alpha_step_size=_step(args.alpha_step_size), chi=args.chi,
                   seed=args.seed, progress=True)
    out = _run_dir(args)
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "theta.npy"), result.theta)
    result.history.to_csv(os.path.join(out, "history.csv"), index=False)
    settings = {k: v for k, v in vars(args).items() if k not in ("config",)}
    settings["solver"] = result.config.describe()
    settings["certificate"] = {"converged": bool(result.converged), "gap": float(result.gap),
                               "relative_gap": float(result.relative_gap), "value": float(result.value),
                               "lower_bound": float(result.lower_bound), "iterations": int(result.n_iter),
                               "bound_kind": result.bound_kind}
    with open(os.path.join(out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=1, default=str)
    for split in ("train", "val", "test"):
        table = evaluate(problem, result.theta, args.loss, args.beta, split)
        table.to_csv(os.path.join(out, f"metrics_{split}.csv"))
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"training objective on the train split: {result.summary()}")
    print(f"run -> {out}")
    return 0


def plot_run(metrics, alpha, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = metrics.drop(index=["worst", "mean"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(groups.index, groups["loss"], color="C0")
    axes[0].set_title("test loss per group")
    axes[1].bar(groups.index, groups["reward_accuracy"], color="C1")
    axes[1].set_title("reward accuracy per group")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    alpha.plot(ax=axes[2])
    axes[2].set_title("α over training")
    axes[2].set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_evaluate(args):
    out = _run_dir(args)
    with open(os.path.join(out, "settings.json")) as fh:
        settings = json.load(fh)
    problem, _ = load_problem(args.workdir, seed=settings["seed"], split_by=settings["split_by"])
    theta = np.load(os.path.join(out, "theta.npy"))
    table = evaluate(problem, theta, settings["loss"], settings["beta"], args.split)
    table.to_csv(os.path.join(out, f"metrics_{args.split}.csv"))
    alpha = alpha_history(pd.read_csv(os.path.join(out, "history.csv")))
    plot_run(table, alpha, os.path.join(out, "groups.png"), f"{args.run} — {args.split}")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_export(args):
    out = args.out or os.path.join(_run_dir(args), "model")
    problem, _ = load_problem(args.workdir)
    theta = np.load(os.path.join(_run_dir(args), "theta.npy"))
    loaded = ex.load_model(args.model, revision=args.revision, gguf_file=args.gguf_file, device="cpu")
    export_model(loaded.model, loaded.tokenizer, problem.features, theta, out, theta_ref=problem.theta_ref,
                 model_spec=loaded.spec, save_full=not args.delta_only)
    print(f"exported -> {out}")
    return 0


COMMANDS = {"extract": cmd_extract, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export}


def main(argv=None):
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
