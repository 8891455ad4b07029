"""``python -m llm_head {extract,train,select,compare,evaluate,export}`` — group-robust last-layer tuning
on anyone's grouped preference data.

    python -m llm_head extract  --data pairs.jsonl --model smollm2 --workdir results/pairs --split-by question_id
    python -m llm_head train    --workdir results/pairs --loss sigmoid --method group_robust --seed 0
    python -m llm_head select   --workdir results/pairs --radii 0 0.3 1 3 --adjustments 0 1 4
    python -m llm_head compare  --workdir results/pairs --seeds 3 --radii 0 0.3 1 3 --adjustments 0 1 4
    python -m llm_head evaluate --workdir results/pairs --run sigmoid-group_robust-seed0
    python -m llm_head export   --workdir results/pairs --run sigmoid-group_robust-seed0

``--data`` takes TRL's standard (``prompt``/``chosen``/``rejected`` strings) or conversational
(lists of ``{"role", "content"}`` messages) preference format with a group column, as a
``.jsonl``/``.json``/``.csv``/``.parquet`` file or a hub id (``datasets.load_dataset``), or a
GlobalOpinionQA table (detected by its columns; countries are the groups). Every flag can also come
from a TOML file (``--config settings.toml``; keys are the flag names with underscores, at the top
level or in an ``[extract]``/``[train]``/… table); flags on the command line win. ``extract`` under
``torchrun --nproc_per_node N -m llm_head extract …`` splits the cache shards over the N processes.

Work folder: ``features.safetensors`` (+ its checksum), ``dataset.json``, ``runs/<run>/``
(``theta.npy``, ``history.csv``, ``settings.json``, ``metrics_<split>.csv``, ``groups.png``,
``model/``; a select run also ``selection.csv``, ``selection.png``), ``compare/<loss>/`` (``heads.csv``,
``paired.csv``, ``report.md``, ``compare.png``); see :mod:`llm_head.workdir`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tomllib
import warnings

import numpy as np
import pandas as pd

import loglinear_grpo as lg
from loglinear_grpo.inference import MIN_GROUP_PAIRS, proportion_interval, small_group_note
from loglinear_grpo.settings import ESTIMATOR_CHOICES

from . import extract as ex
from . import workdir as wd
from .data import detect_format, items_from_pairs, load_preference_pairs, read_table
from .features import CSR_LIMIT_BYTES
from .head import export_delta, export_model, reference_theta
from .opinions import DEFAULT_TEMPLATE, PAPER_COUNTRIES
from .plots import group_axis, groupings_of
from .train import AGGREGATES, alpha_history, evaluate, objective_meaning, solver_config, train

LOSSES = ("ipo", "dpo", "sigmoid", "hinge")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help (when there is one), and the description kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _integer(text, low):
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def _positive_int(text):
    """An integer >= 1 (argparse prefixes the flag to the error)."""
    return _integer(text, 1)


def _non_negative_int(text):
    """An integer >= 0."""
    return _integer(text, 0)


def _finite(text, what):
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_float(text):
    """A finite number > 0."""
    value = _finite(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text):
    """A finite number >= 0."""
    value = _finite(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _tolerance(text):
    """A finite number >= 0 (0: no tolerance, run all steps)."""
    value = _finite(text, "a finite number >= 0 (0: run all steps)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: run all steps), got {text!r}")
    return value


def _unit_interval(text):
    """A number in [0, 1]."""
    value = _finite(text, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _step_size_type(*words):
    """A first-order step size: a finite number > 0, ``c/sqrt(t)`` (c > 0, default 1) or one of ``words``."""
    forms = ", ".join(repr(w) for w in words + ("c/sqrt(t)",))

    def parse(text):
        text = str(text).strip()
        if text in words:
            return text
        head, sep, tail = text.partition("/")
        if sep and tail.replace(" ", "") == "sqrt(t)":
            if head.strip():
                _finite(head, f"a number > 0, {forms}")
                if float(head) <= 0:
                    raise argparse.ArgumentTypeError(f"must be a number > 0, {forms}, got {text!r}")
            return text
        try:
            return _positive_float(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be a number > 0, {forms}, got {text!r}") from None
    parse.__name__ = "step size"
    return parse


def _common(p):
    p.add_argument("--config", help="TOML settings file (flags override it)")
    p.add_argument("--workdir", default="results/llm", help="folder for features and runs")


def _grid_flags(p):
    """--radii, --adjustments and --criterion of select and compare."""
    from .select import CRITERIA, DEFAULT_ADJUSTMENTS, DEFAULT_RADII
    p.add_argument("--radii", nargs="+", type=_non_negative_float, default=list(DEFAULT_RADII), metavar="R",
                   help="the radii to try (R = 0, the reference head θ_ref, is always tried)")
    p.add_argument("--adjustments", nargs="+", type=_non_negative_float, default=list(DEFAULT_ADJUSTMENTS),
                   metavar="C", help="the group adjustments C to try (group_robust only; vanilla and "
                                     "importance_sampling ignore C)")
    p.add_argument("--criterion", choices=tuple(CRITERIA), default="worst-loss",
                   help="validation score: worst-loss (the worst validation group's loss, lower is better) or "
                        "min-accuracy (the min-group rewards/accuracies, higher is better)")


def _training_flags(p, select):
    """The flags of train; select has --radii/--adjustments/--criterion instead of --radius/--adjustment."""
    _common(p)
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="TRL's names: 'sigmoid' is DPO")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="β of the loss (TRL's default)")
    p.add_argument("--method", choices=("group_robust", "importance_sampling", "vanilla"), default="group_robust",
                   help="group_robust: min over θ of the worst group's loss; vanilla: the mean over pairs")
    p.add_argument("--estimator", choices=ESTIMATOR_CHOICES, default="auto",
                   help="'auto': the certified second-order solver, dense ('newton') where its matrices fit half "
                        "the memory, else matrix-free ('newton_cg')")
    p.add_argument("--max-cg", type=_positive_int, default=None,
                   help="newton_cg: Krylov iterations per model step at most (default 250)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="iteration budget (default: the estimator's: 200 Newton iterations, 300 for newton_cg, ...)")
    p.add_argument("--tol", type=_tolerance, default=1e-6,
                   help="stop at this relative certified duality gap (0: run all steps)")
    if not select:
        p.add_argument("--radius", type=_positive_float, default=1.0, help="Θ = L2 ball of this radius around θ_ref")
    p.add_argument("--step-size", type=_step_size_type("theory"), default=None,
                   help="first-order estimators only: number, 'theory' or 'c/sqrt(t)' (default: 1/L)")
    p.add_argument("--alpha-step-size", type=_step_size_type("theory", "auto"), default=None,
                   help="first-order estimators only: number, 'theory', 'auto' or 'c/sqrt(t)'")
    p.add_argument("--chi", type=_unit_interval, default=1.0,
                   help="worst-case/average trade-off in [0, 1] (Appendix B.4)")
    if select:
        _grid_flags(p)
    else:
        p.add_argument("--adjustment", type=_non_negative_float, default=0.0,
                       help="group adjustment C (Sagawa et al. 2020): group g's loss counts as L_g + C/sqrt(N_g), "
                            "favouring small groups; 0: none")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="split (and GlobalOpinionQA's rejected answers) and sampler seed")
    p.add_argument("--split-by", default=None, help="override the split chosen at extraction")
    p.add_argument("--storage", choices=("auto", "csr", "implicit"), default="auto",
                   help="S as a CSR matrix or implicit (from the memory-mapped hidden states; for long answers); "
                        f"auto: CSR up to {CSR_LIMIT_BYTES >> 30} GiB")
    p.add_argument("--run", help="run name (default: " + ("select-" if select else "") + "<loss>-<method>-seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")



def build_parser():
    parser = argparse.ArgumentParser(prog="python -m llm_head", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="frozen-LLM features of every prompt and candidate answer (cached)",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--data", help="preference pairs (.jsonl/.json/.csv/.parquet, a datasets save_to_disk folder or "
                                  "a hub id) or a GlobalOpinionQA table; default: the hub dataset "
                                  "Anthropic/llm_global_opinions")
    p.add_argument("--group-column", "--group-columns", nargs="+", dest="group_column", default=["group"],
                   metavar="COLUMN",
                   help="the column that names each pair's group; several (--group-columns country age_band) are "
                        "several groupings at once: the union of their groups ('country=Kenya', 'age_band=18-24'; "
                        "each pair in one group of each), so that GR serves the worst-off country and the worst-off "
                        "age band; with --intersect the cells of their cross product instead")
    p.add_argument("--intersect", action="store_true",
                   help="with several --group-columns: one group per non-empty cell of their cross product "
                        "('country=Kenya & age_band=18-24') instead of their union")
    p.add_argument("--min-group-size", type=_positive_int, default=1, metavar="N",
                   help="with --intersect: cells with fewer than N pairs are reported, and handled by --small-groups")
    p.add_argument("--small-groups", choices=("keep", "merge", "drop"), default="keep",
                   help="with --intersect: the cells below --min-group-size are kept as they are, merged into one "
                        "cell, or dropped (their pairs reported as skipped)")
    p.add_argument("--groups", "--countries", nargs="+", dest="groups", default=None,
                   help="keep these groups, in this order (GlobalOpinionQA default: the paper's five countries)")
    p.add_argument("--split-by", default=None,
                   help="default split for train: a seeded split by this column (e.g. question_id) so that no "
                        "value is in two splits; default: by prompt (GlobalOpinionQA: 'item', per country, or "
                        "'question'); a 'split' column in the data is used as given")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompts with the tokenizer's chat template (always for conversational data)")
    p.add_argument("--add-eos", choices=("auto", "yes", "no"), default="auto",
                   help="append EOS to every answer (auto: yes for TRL's standard format, as TRL does; no for "
                        "GlobalOpinionQA's one-letter answers)")
    p.add_argument("--hub-split", default=None, help="one split of a hub dataset (default: all of them)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a JSON Lines file with a malformed line (naming it) instead of skipping and "
                        "reporting such lines")
    p.add_argument("--model", default=ex.DEFAULT_MODEL, help="hub id, local folder, .gguf file or 'smollm2'")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of the model")
    p.add_argument("--gguf-file", help="GGUF file name inside a model folder")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="GlobalOpinionQA prompt template")
    p.add_argument("--limit", type=_positive_int, help="use only the first N pairs (items) of each group")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per forward pass")
    p.add_argument("--shard-items", type=_positive_int, default=None,
                   help="prompts per cache shard: the unit of resumption and of work per rank (default: "
                        f"{ex.DEFAULT_SHARD_ITEMS} on a GPU, {ex.CPU_SHARD_ITEMS} on a CPU, so that an interrupted "
                        "CPU run loses about a minute; a run resumes with the size it started with)")
    p.add_argument("--padding-side", choices=("right", "left"), default="right",
                   help="pad batches on this side (the features do not depend on it)")
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="tokens allowed per prompt + its longest answer, checked before any forward pass "
                        "(default: the model's context, config.max_position_embeddings)")
    p.add_argument("--truncation", choices=ex.TRUNCATION_MODES, default="error",
                   help="an item over the limit: 'error' refuses the data (with the count and the longest); "
                        "'keep_end' cuts its prompt from the left, as TRL's truncation_mode='keep_end' (reported "
                        "with the count)")
    p.add_argument("--cache-dir", help="default: <workdir>/cache")
    p.add_argument("--force", action="store_true",
                   help="replace features that runs were trained on (the old runs move to runs-<old sha>/)")

    p = sub.add_parser("train", help="fit the output rows with loglinear_grpo.solve (certified)",
                       formatter_class=_Formatter)
    _training_flags(p, select=False)

    p = sub.add_parser("select", help="choose R (and C) on the validation split: a certified solve per grid point, "
                                      "the best one written as a run", formatter_class=_Formatter)
    _training_flags(p, select=True)

    p = sub.add_parser("compare", help="did GR help the worst group? reference, vanilla and GR heads, each with "
                                       "its own selection, on the test split of several seeds, paired intervals",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="TRL's names: 'sigmoid' is DPO")
    p.add_argument("--beta", type=_positive_float, default=0.1, help="β of the loss (TRL's default)")
    p.add_argument("--seeds", type=_positive_int, default=3,
                   help="seeds 0..N-1, each a redrawn train/val/test split (at least 2, for an interval)")
    _grid_flags(p)
    p.add_argument("--interval", choices=("t", "bootstrap"), default="t",
                   help="the intervals over seeds: Student t, or a percentile bootstrap of the paired differences")
    p.add_argument("--tol", type=_tolerance, default=1e-6,
                   help="stop every solve at this relative certified duality gap (0: run all steps)")
    p.add_argument("--split-by", default=None, help="override the split chosen at extraction")
    p.add_argument("--storage", choices=("auto", "csr", "implicit"), default="auto",
                   help="S as a CSR matrix or implicit (see train --help)")
    p.add_argument("--out", help="default: <workdir>/compare/<loss>")

    p = sub.add_parser("evaluate", help="per-group metrics of a run on a split, CSV + figure",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--run", required=True, help="the run's name (see <workdir>/runs)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="the pairs to evaluate on")

    p = sub.add_parser("export", help="write a run's rows into the model's (untied) output layer",
                       formatter_class=_Formatter)
    _common(p)
    p.add_argument("--run", required=True, help="the run's name (see <workdir>/runs)")
    p.add_argument("--model", default=None, help="default: the model the work folder's features came from")
    p.add_argument("--revision", help="hub revision of the model")
    p.add_argument("--gguf-file", help="GGUF file name inside a model folder")
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
        for action in sub._actions:
            if action.dest in flat:
                flat[action.dest] = _config_value(parser, args.config, action, flat[action.dest])
        sub.set_defaults(**flat)
        args = parser.parse_args(argv)
    return args


def _config_value(parser, config, action, value):
    """A value from the TOML file checked as the flag's own would be: argparse applies neither the type
    nor the choices to defaults that are not strings (a TOML ``tol = nan`` would pass unchecked)."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    many = action.nargs in ("+", "*") and isinstance(value, list)
    checked = []
    for item in (value if many else [value]):
        if action.type is not None:
            if isinstance(item, bool):
                parser.error(f"{config}: {flag}: got the boolean {item}")
            try:
                item = action.type(item if isinstance(item, str) else str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
                parser.error(f"{config}: {flag}: {exc}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"{config}: {flag}: {item!r} is not one of {sorted(action.choices)}")
        checked.append(item)
    return checked if many else checked[0]


# ============================================================================ commands
def _requested_spec(args):
    """What of the model spec ``extract`` will record is known before the model loads."""
    spec = {"model": str(args.model), "revision": args.revision}
    try:
        spec["gguf_file"] = ex.resolve_model_id(args.model, args.gguf_file)[1]
        spec["dtype"] = str(ex.resolve_dtype(args.device or ex.default_device(), args.dtype)).replace("torch.", "")
    except (OSError, ValueError, ImportError):
        pass                                        # load_model says what is wrong
    return spec


def cmd_extract(args):
    wd.check_output_folder(args.workdir, "--workdir")           # before the model loads: one line, not a traceback
    if args.cache_dir:
        wd.check_output_folder(args.cache_dir, "--cache-dir")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available() and args.device is None:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    source = args.data if args.data is not None else "Anthropic/llm_global_opinions"
    frame, name = read_table(source, split=args.hub_split, strict=args.strict)
    kind = detect_format(frame, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the report below says what was skipped
        columns = [args.group_column] if isinstance(args.group_column, str) else list(args.group_column)
        pairs = load_preference_pairs(frame, group_column=columns[0] if len(columns) == 1 else columns,
                                      groups=args.groups,
                                      countries=args.groups or (PAPER_COUNTRIES if kind == "global_opinions" else None),
                                      limit=args.limit, template=args.template, name=name, intersect=args.intersect,
                                      min_group_size=args.min_group_size, small_groups=args.small_groups)
    wd.check_split_by(kind, pairs, args.split_by)                # a typo refused now, not by `train`
    items = items_from_pairs(pairs)
    add_eos = {"yes": True, "no": False}.get(args.add_eos, kind == "pairs" and not pairs.conversational)
    rendering = ex.Rendering(chat_template=bool(args.chat_template or pairs.conversational), add_eos=add_eos)
    record = wd.dataset_record(pairs, items, rendering, kind, pairs.opinion_items)
    record["split_by"] = args.split_by
    record["truncation"] = {"max_length": args.max_length, "mode": args.truncation}
    wd.check_extract_target(args.workdir, record, _requested_spec(args), force=args.force)   # before the model
    print(f"{name}: {pairs.report()}; {len(items)} distinct prompts, "
          f"{int(items['candidates'].map(len).sum())} candidate answers; rendering {rendering.describe()}")
    loaded = ex.load_model(args.model, revision=args.revision, gguf_file=args.gguf_file, device=args.device,
                           dtype=args.dtype)
    tic = time.perf_counter()
    features = ex.extract_features(loaded, list(items["prompt"]), list(items["candidates"]),
                                   cache_dir=args.cache_dir or wd.paths(args.workdir)["cache"],
                                   template=args.template if kind == "global_opinions" else "",
                                   batch_size=args.batch_size, shard_items=args.shard_items,
                                   padding_side=args.padding_side, rendering=rendering,
                                   max_length=args.max_length, truncation=args.truncation)
    seconds = time.perf_counter() - tic
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        record["extraction_seconds"] = seconds
        sha = wd.save_workdir(args.workdir, features, reference_theta(loaded.model, features), record,
                              loaded.spec, force=args.force)
        print(f"features: {features.hidden.shape[0]} hidden states of size {features.hidden_size}, "
              f"|V'| = {features.vocab.size}, dim θ = {features.dim}, {seconds:.1f} s "
              f"-> {args.workdir} (sha256 {sha[:12]}…)")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _step(value):
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


#: solver argument names, as their flags (for errors of loglinear_grpo.make_config)
_SOLVER_FLAGS = {name: "--" + name.replace("_", "-") for name in
                 ("beta", "method", "estimator", "steps", "tol", "radius", "chi", "seed", "step_size",
                  "alpha_step_size", "loss", "adjustment", "max_cg")}
_SOLVER_NAME = re.compile(r"\b(" + "|".join(sorted(_SOLVER_FLAGS, key=len, reverse=True)) + r")\b(?=\s*[=:]| must)")


def _as_flags(message):
    """A solver error in the words of the command line: ``step_size: ...`` → ``--step-size: ...``."""
    return _SOLVER_NAME.sub(lambda m: _SOLVER_FLAGS[m.group(1)], message)


def _finite_or_none(value):
    """A float for settings.json: non-finite values (no certificate) become null (JSON has no NaN)."""
    value = float(value)
    return value if np.isfinite(value) else None


def _write_json(path, obj):
    """Strict JSON (``allow_nan=False``: a NaN or infinity is an error, not an invalid file)."""
    text = json.dumps(obj, indent=1, default=str, allow_nan=False)
    with open(path, "w") as fh:
        fh.write(text)


def cmd_train(args):
    """Validate everything (the name, the work folder, every solver setting), reserve the run name,
    train into the reservation, and publish the complete run (swapping out an old one with
    ``--overwrite``); see :func:`llm_head.workdir.training_run`."""
    args.run = wd.check_run_name(args.run or f"{args.loss}-{args.method}-seed{args.seed}")
    wd.check_can_train(args.workdir, args.run, args.overwrite)            # fail fast; re-checked atomically
    split_by = args.split_by or record_split(args)
    problem, record = wd.load_problem(args.workdir, seed=args.seed, split_by=split_by, storage=args.storage)
    try:
        config = solver_config(problem, loss=args.loss, beta=args.beta, method=args.method,
                               estimator=args.estimator, steps=args.steps,
                               tol=args.tol if args.tol and args.tol > 0 else None, radius=args.radius,
                               step_size=_step(args.step_size), alpha_step_size=_step(args.alpha_step_size),
                               chi=args.chi, seed=args.seed, adjustment=args.adjustment or None,
                               max_cg=args.max_cg)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None
    settings = {k: v for k, v in vars(args).items() if k not in ("config",)}
    settings["split_by"] = split_by
    settings["features_sha256"] = problem.features_sha256
    settings["dataset_sha256"] = wd.dataset_sha(record)
    settings["groups"] = list(record["groups"])
    final = wd.run_dir(args.workdir, args.run)
    try:
        with wd.training_run(args.workdir, args.run, overwrite=args.overwrite) as out:
            result = train(problem, config=config, progress=True)
            np.save(os.path.join(out, "theta.npy"), result.theta)
            result.history.to_csv(os.path.join(out, "history.csv"), index=False)
            storage_used = "implicit" if problem.data("train").is_operator else "csr"
            settings["storage_used"] = storage_used              # what --storage auto chose
            settings.update(_result_settings(problem, result, args))
            tables = _evaluate_splits(problem, result.theta, args.loss, args.beta, out)
            _write_json(os.path.join(out, wd.RUN_MARKER), settings)      # last: it makes the run complete
    except OSError as exc:
        raise OSError(f"run {args.run!r} was not written ({exc}); nothing of it was kept, "
                      f"and an old run of that name is untouched") from None
    shown = next((s for s in ("test", "val", "train") if s in tables), None)
    if shown is not None:
        _print_table(tables[shown], shown, problem)
    print(_train_summary(problem, result, args, storage_used))
    print(f"run -> {final}")
    return 0


def _result_settings(problem, result, args):
    """What settings.json records of a solution: ``solver`` (its settings), ``alpha_star`` (the
    certificate's group weights, by train group) and ``certificate`` (converged, gap, the objective's
    meaning and value, ...). A :class:`loglinear_grpo.ReferencePoint` (R = 0) has no solver settings."""
    train_names = [str(g) for g in problem.data("train").group_names]
    config = getattr(result, "config", None)
    return {"solver": config.describe() if config is not None else
            "none: R = 0, θ = θ_ref (the reference head, the frozen model), exact",
            "alpha_star": dict(zip(train_names, (float(a) for a in result.alpha))),
            "certificate": {"converged": bool(result.converged), "gap": _finite_or_none(result.gap),
                            "relative_gap": _finite_or_none(result.relative_gap),
                            "objective": objective_meaning(args.method, args.chi, args.adjustment),
                            "value": _finite_or_none(result.value),
                            "lower_bound": _finite_or_none(result.lower_bound),
                            "iterations": int(result.n_iter), "bound_kind": result.bound_kind},
            "memory": getattr(result, "memory", None)}


def _history(problem, result, loss, beta):
    """``history.csv`` of a solution; for R = 0 (nothing solved) one row: step 0, the group losses, α and
    the value, as a solve's history has them."""
    history = getattr(result, "history", None)
    if history is not None:
        return history
    data = problem.data("train")
    losses = lg.group_losses(result.theta, data, loss, beta)
    row = {"step": 0, "worst_loss": float(losses.max())}
    row |= {f"loss/{g}": float(v) for g, v in zip(data.group_names, losses)}
    row |= {f"alpha/{g}": float(a) for g, a in zip(data.group_names, result.alpha)}
    row |= {"gap": 0.0, "value": float(result.value), "lower_bound": float(result.value)}
    return pd.DataFrame([row])


def _json_safe(value):
    """Scores for settings.json: numpy scalars as Python ones, non-finite floats as null."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite_or_none(value)
    return value


#: the grid flags of select/compare, for errors of llm_head.select
_GRID_FLAGS = {"radii": "--radii", "adjustments": "--adjustments", "criterion": "--criterion"}


def _grid_error(message):
    """An error of llm_head.select in the words of the command line (``radii: ...`` → ``--radii: ...``)."""
    for name, flag in _GRID_FLAGS.items():
        if message.startswith(name + " ") or message.startswith(name + ":"):
            return flag + message[len(name):]
    return _as_flags(message)


def cmd_select(args):
    """train at every point of the R × C grid, score each on the validation split, write the best
    one as a run (as ``train`` writes one), with ``selection.csv``, ``selection.png`` and the grid, the
    scores and the choice in settings.json."""
    from .select import check_criterion, check_grid, plot_selection, select_head
    args.run = wd.check_run_name(args.run or f"select-{args.loss}-{args.method}-seed{args.seed}")
    try:
        radii, adjustments = check_grid("radii", args.radii), check_grid("adjustments", args.adjustments)
        check_criterion(args.criterion)
    except ValueError as exc:
        raise ValueError(_grid_error(str(exc))) from None
    wd.check_can_train(args.workdir, args.run, args.overwrite)            # fail fast; re-checked atomically
    split_by = args.split_by or record_split(args)
    problem, record = wd.load_problem(args.workdir, seed=args.seed, split_by=split_by, storage=args.storage)
    solve_kw = dict(estimator=args.estimator, steps=args.steps, step_size=_step(args.step_size),
                    alpha_step_size=_step(args.alpha_step_size), chi=args.chi, seed=args.seed,
                    max_cg=args.max_cg)
    try:                                             # every solver setting checked before the first solve
        solver_config(problem, loss=args.loss, beta=args.beta, method=args.method, radius=max(radii) or 1.0,
                      tol=args.tol if args.tol and args.tol > 0 else None, adjustment=max(adjustments) or None,
                      **solve_kw)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc))) from None
    selection = select_head(problem, loss=args.loss, method=args.method, radii=radii, adjustments=adjustments,
                            criterion=args.criterion, beta=args.beta, tol=args.tol, progress=True, **solve_kw)
    result = selection.result
    args.radius, args.adjustment = selection.radius, selection.adjustment
    settings = {k: v for k, v in vars(args).items() if k not in ("config",)}
    settings["split_by"] = split_by
    settings["features_sha256"] = problem.features_sha256
    settings["dataset_sha256"] = wd.dataset_sha(record)
    settings["groups"] = list(record["groups"])
    settings["selection"] = {
        "criterion": args.criterion,
        "grid": [{k: _json_safe(v) for k, v in row.items()} for row in selection.scores.to_dict("records")],
        "chosen": {"radius": selection.radius, "adjustment": selection.adjustment},
        "notes": list(selection.notes)}
    final = wd.run_dir(args.workdir, args.run)
    try:
        with wd.training_run(args.workdir, args.run, overwrite=args.overwrite) as out:
            np.save(os.path.join(out, "theta.npy"), result.theta)
            _history(problem, result, args.loss, args.beta).to_csv(os.path.join(out, "history.csv"), index=False)
            storage_used = "implicit" if problem.data("train").is_operator else "csr"
            settings["storage_used"] = storage_used
            settings.update(_result_settings(problem, result, args))
            selection.scores.to_csv(os.path.join(out, "selection.csv"), index=False)
            plot_selection(selection, os.path.join(out, "selection.png"),
                           f"{args.run}: {args.method} ({args.loss}), validation {args.criterion}")
            tables = _evaluate_splits(problem, result.theta, args.loss, args.beta, out)
            _write_json(os.path.join(out, wd.RUN_MARKER), settings)      # last: it makes the run complete
    except OSError as exc:
        raise OSError(f"run {args.run!r} was not written ({exc}); nothing of it was kept, "
                      f"and an old run of that name is untouched") from None
    if "val" in tables:
        _print_table(tables["val"], "val", problem)
    print(_train_summary(problem, result, args, storage_used))
    if selection.radius > 0:
        print("reproduce: " + _reproduce_command(args, selection))
    print(f"run -> {final} (selection.csv, selection.png)")
    return 0


#: the flags of ``train`` that ``select`` shares and its reproduce line must carry when they differ from
#: their defaults: {attribute: (flag, default)}
_SHARED_TRAIN_FLAGS = {"estimator": ("--estimator", "auto"), "steps": ("--steps", None), "tol": ("--tol", 1e-6),
                       "step_size": ("--step-size", None), "alpha_step_size": ("--alpha-step-size", None),
                       "chi": ("--chi", 1.0), "storage": ("--storage", "auto"), "split_by": ("--split-by", None),
                       "max_cg": ("--max-cg", None)}


def _reproduce_command(args, selection):
    """The ``train`` command that solves the selected point again: every setting of the selection,
    numbers written exactly (``repr``), the shared flags only where they differ from their defaults."""
    words = ["python -m llm_head train", f"--workdir {args.workdir}", f"--loss {args.loss}", f"--beta {args.beta!r}",
             f"--method {args.method}", f"--radius {float(selection.radius)!r}",
             f"--adjustment {float(selection.adjustment)!r}", f"--seed {args.seed}"]
    for attr, (flag, default) in _SHARED_TRAIN_FLAGS.items():
        value = getattr(args, attr, default)
        if value is not None and value != default:
            words.append(f"{flag} {value!r}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(words)


def cmd_compare(args):
    """reference, vanilla and group-robust heads on the test split of ``--seeds`` seeds, each trained
    head with its own validation selection; heads.csv, paired.csv, report.md and compare.png."""
    from .compare import compare_methods
    from .select import check_criterion, check_grid
    try:
        check_grid("radii", args.radii), check_grid("adjustments", args.adjustments)
        check_criterion(args.criterion)
    except ValueError as exc:
        raise ValueError(_grid_error(str(exc))) from None
    if args.seeds < 2:
        raise ValueError(f"--seeds: an interval over seeds needs at least 2 seeds, got {args.seeds}")
    out = args.out or os.path.join(args.workdir, "compare", args.loss)
    wd.check_output_folder(out, "--out")
    split_by = args.split_by or record_split(args)
    comparison = compare_methods(args.workdir, loss=args.loss, seeds=args.seeds, radii=args.radii,
                                 adjustments=args.adjustments, criterion=args.criterion, beta=args.beta,
                                 split_by=split_by, storage=args.storage, interval=args.interval, tol=args.tol,
                                 progress=True)
    files = comparison.write(out)
    print(comparison.summary())
    print(f"compare -> {out} ({', '.join(os.path.basename(f) for f in files)})")
    return 0


def record_split(args):
    """The split chosen at extraction (``--split-by`` of extract), if any."""
    try:
        with open(wd.paths(args.workdir)["dataset"]) as fh:
            return json.load(fh).get("split_by")
    except (OSError, ValueError):
        return None


def _train_summary(problem, result, args, storage_used):
    """The line ``train`` ends with: what the objective's value means, the worst training group and its
    loss (for every method), and the certificate."""
    data = problem.data("train")
    losses = lg.group_losses(result.theta, data, args.loss, args.beta)
    worst = int(np.argmax(losses))
    meaning = objective_meaning(args.method, args.chi, args.adjustment)
    return (f"training objective ({args.method}, {args.loss}) on the train split, S stored as {storage_used} "
            f"(--storage {args.storage}): {meaning} = {result.value:.6g}; "
            f"worst train group: {data.group_names[worst]} {losses[worst]:.4f}; converged={result.converged}, "
            f"certified gap {result.gap:.3e} (relative {result.relative_gap:.2e}, {result.bound_kind}), "
            f"{result.n_iter} iterations" + _solver_line(result))


def _solver_line(result):
    """The second line of ``train``'s summary: which solver ran, why, its memory (none for the reference
    point R = 0, which solves nothing)."""
    line = result.solver_summary() if hasattr(result, "solver_summary") else None
    return "" if line is None else "\n" + line


def _print_table(table, split, problem):
    """The metrics table, with what its aggregate rows are, and a flag on every group too small for its
    rewards/accuracies to say much (with the interval its size allows)."""
    absent = [g for g in problem.group_names if g not in set(problem.data(split).group_names)]
    groups = table.loc["group"]
    notes, flags = {}, {}
    for name, row in groups.iterrows():
        if pd.notna(row["n_pairs"]):
            n, accuracy = int(row["n_pairs"]), float(row["rewards/accuracies"])
            note = small_group_note(n, accuracy, minimum=MIN_GROUP_PAIRS)
            if note:
                notes[name] = note.replace(" test pair", f" {split} pair")   # its words are for a test split
                low, high = proportion_interval(accuracy * n, n)
                flags[name] = f"< {MIN_GROUP_PAIRS} pairs, {low:.2f} to {high:.2f}"
    shown = table.copy()
    shown["worst_group"] = shown["worst_group"].fillna("")
    if flags:                                      # a flag in the table itself, the full notes below it
        shown["small group: accuracy 95% CI"] = [
            flags.get(name, "") if kind == "group" else "" for kind, name in shown.index]
    total = int(table.loc[("aggregate", "mean over pairs"), "n_pairs"])
    print(f"metrics on the {split} split ({total} pairs):")
    print(shown.to_string(float_format=lambda v: f"{v:.4f}"))
    print("aggregate rows:")
    for key, what in AGGREGATES.items():
        print(f"  {key}: {what}")
    for grouping in problem.groupings():
        print(f"  worst {grouping}: the worst group of the grouping {grouping} (its row; groups overlap: each pair is in "
              f"one group of each grouping, and mean over pairs counts it once)")
    for name, note in notes.items():
        print(f"note: group {name}: {note}")
    if absent:
        print(f"note: no {split} pairs for {len(absent)} group(s): {', '.join(absent)} (NaN rows)")


def _evaluate_splits(problem, theta, loss, beta, out):
    """metrics_<split>.csv for every split that has pairs; a missing split is reported and skipped."""
    tables = {}
    for split in ("train", "val", "test"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tables[split] = evaluate(problem, theta, loss, beta, split)
        except ValueError as exc:
            print(f"note: {exc}; no metrics for it")
            continue
        tables[split].to_csv(os.path.join(out, f"metrics_{split}.csv"))
    return tables


def plot_run(heads, alpha_star, path, title, split):
    """``groups.png``: per group, the ``split``'s loss and rewards/accuracies of every head (grouped
    bars, one colour a head), and the certificate's optimal group weights α* (train split) as a third
    panel.

    Parameters
    ----------
    heads : dict
        ``{label: metrics table of evaluate}``, in the order to draw them (e.g. ``{"reference (θ_ref)":
        …, "this run": …}``; a ``compare`` can pass reference, vanilla and GR heads together). The
        groups are the first table's.
    alpha_star : Mapping or Series or None
        {training group: weight}; None draws no α* panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not heads:
        raise ValueError("plot_run needs at least one head")
    first = next(iter(heads.values()))
    names = list(first.loc["group"].index)            # the groups' rows, whatever they are called
    groupings = groupings_of(first)                   # overlapping groups: marked by grouping
    x = np.arange(len(names))
    width = 0.8 / len(heads)
    rotate = len(names) > 4
    panels = 3 if alpha_star is not None else 2
    if len(names) <= 6:                               # side by side; many groups: one panel a row
        fig, axes = plt.subplots(1, panels, figsize=(13, 4.8))
    else:
        fig, axes = plt.subplots(panels, 1, figsize=(max(10, (0.25 + 0.18 * len(heads)) * len(names) + 2),
                                                     3.6 * panels))

    def ticks(ax):
        group_axis(ax, names, groupings, rotate=rotate)

    for ax, column in zip(axes[:2], ("loss", "rewards/accuracies")):
        for k, (label, table) in enumerate(heads.items()):
            values = table.loc["group"].reindex(names)[column].to_numpy(dtype=float)
            ax.bar(x + (k - (len(heads) - 1) / 2) * width, values, width, color=f"C{k}", label=str(label))
        empty = next(iter(heads.values())).loc["group"].reindex(names)["n_pairs"].isna().to_numpy()
        for position in x[empty]:                  # a group without pairs in the split: say so, not a gap
            ax.text(position, 0, f"no {split}\npairs", ha="center", va="bottom", fontsize=6, color="0.4")
        ticks(ax)
        ax.set_title(f"{split} {column} per group", fontsize=10)
    handles, names_of = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_of, loc="lower center", ncol=len(heads), fontsize=8, frameon=False)
    if alpha_star is not None:
        weights = pd.Series(dict(alpha_star), dtype=float)
        ax = axes[2]
        ax.bar(x, weights.reindex([str(g) for g in names]).to_numpy(dtype=float), 0.6, color="C2")
        if len(weights):
            ax.axhline(1.0 / len(weights), color="k", linewidth=0.8, linestyle=":", label="uniform 1/K")
            ax.legend(fontsize=7)
        top = float(np.nanmax(weights.to_numpy())) if len(weights) else 1.0
        ax.set_ylim(0, min(1.0, 1.15 * top) if top > 0 else 1.0)
        ticks(ax)                                      # after the limits: the groupings' names get head room
        ax.set_title("α*: the certificate's optimal group weights (train split)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(names) <= 6 else 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _alpha_star(settings, out):
    """α* of a run: ``settings.json``'s ``alpha_star``, or (a run from before it was recorded) the last
    row of ``history.csv``."""
    if settings.get("alpha_star"):
        return settings["alpha_star"]
    try:
        alpha = alpha_history(pd.read_csv(os.path.join(out, "history.csv")))
    except (OSError, ValueError, KeyError):
        return None
    return alpha.iloc[-1].to_dict() if len(alpha) else None


def cmd_evaluate(args):
    settings = wd.check_run(args.workdir, args.run)
    out = wd.run_dir(args.workdir, args.run)
    problem, _ = wd.load_problem(args.workdir, seed=settings["seed"], split_by=settings.get("split_by"),
                                 storage=settings.get("storage", "auto"))
    theta = np.load(os.path.join(out, "theta.npy"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # absent groups are listed below
            table = evaluate(problem, theta, settings["loss"], settings["beta"], args.split)
            reference = evaluate(problem, problem.theta_ref, settings["loss"], settings["beta"], args.split)
    except ValueError as exc:
        raise SystemExit(f"{exc}: nothing to evaluate (splits with pairs: "
                         f"{sorted(problem.pairs['split'].unique())})") from None
    table.to_csv(os.path.join(out, f"metrics_{args.split}.csv"))
    heads = {"reference head (θ_ref, frozen)": reference, f"this run ({args.run})": table}
    plot_run(heads, _alpha_star(settings, out), os.path.join(out, "groups.png"),
             f"{args.run} — evaluated on the {args.split} split", args.split)
    _print_table(table, args.split, problem)
    return 0


def cmd_export(args):
    wd.check_run(args.workdir, args.run)
    if args.out:
        wd.check_output_folder(args.out, "--out")
    out = args.out or os.path.join(wd.run_dir(args.workdir, args.run), "model")
    features, theta_ref, _, spec, _ = wd.load_workdir(args.workdir)
    theta = np.load(os.path.join(wd.run_dir(args.workdir, args.run), "theta.npy"))
    if args.delta_only:             # token ids, θ and θ_ref are in the work folder: no model to load
        export_delta(features, theta, out, theta_ref=theta_ref, model_spec=spec)
        print(f"exported -> {out} (head_delta.safetensors)")
        return 0
    model_id = args.model or spec.get("model")
    if not model_id or model_id.startswith("random "):
        raise SystemExit("export: the work folder records no loadable model; give --model")
    gguf_file = args.gguf_file or (spec.get("gguf_file") if args.model is None and model_id != "smollm2" else None)
    loaded = ex.load_model(model_id, revision=args.revision or spec.get("revision"), gguf_file=gguf_file,
                           device="cpu")
    export_model(loaded.model, loaded.tokenizer, features, theta, out, theta_ref=theta_ref, model_spec=loaded.spec)
    print(f"exported -> {out}")
    return 0


COMMANDS = {"extract": cmd_extract, "train": cmd_train, "select": cmd_select, "compare": cmd_compare,
            "evaluate": cmd_evaluate, "export": cmd_export}


def _warning_line(message, category, filename, lineno, line=None):
    """A warning as the command's user reads it: its kind and message, not the library's source line."""
    return f"warning ({category.__name__}): {message}\n"


def main(argv=None):
    args = parse_args(argv)
    shown, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, MemoryError) as exc:
        raise SystemExit(f"llm_head {args.command}: {exc}") from None
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
