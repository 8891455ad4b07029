"""The work folder of ``python -m llm_head``: features with a checksum, the data they were made from,
and the runs trained on them — kept consistent.

Layout::

    <workdir>/features.safetensors        the merged features and θ_ref (+ features.safetensors.json:
                                          its SHA-256, the model spec, the data fingerprint)
    <workdir>/dataset.json                the pairs (or GlobalOpinionQA items), groups, rendering
    <workdir>/runs/<run>/                 theta.npy, history.csv, settings.json (with the features'
                                          SHA-256), metrics_<split>.csv, groups.png, model/
    <workdir>/cache/                      the extraction cache (shards)

Rules: features are written atomically with their checksum; extracting *different* features into a
folder that already has runs is refused (``force=True`` versions the old runs as
``runs-<old sha>/``); a run records the checksum of the features it was trained on and
:func:`check_run` refuses to evaluate or export it against other features; run names are plain
names that cannot leave the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pandas as pd

from loglinear_grpo._io import atomic_write, make_readable, sha256_file

from .data import PreferencePairs, assign_splits, pair_indices
from .features import LastLayerFeatures

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")


def paths(workdir):
    return {"features": os.path.join(workdir, "features.safetensors"),
            "features_meta": os.path.join(workdir, "features.safetensors.json"),
            "dataset": os.path.join(workdir, "dataset.json"), "runs": os.path.join(workdir, "runs"),
            "cache": os.path.join(workdir, "cache")}


def check_run_name(name):
    """A run name is a plain file name (letters, digits, ``._+=-``): never a path out of the folder."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"--run must be a plain name (letters, digits and ._+=-, at most 128 characters), "
                         f"got {name!r}")
    return name


def run_dir(workdir, run):
    return os.path.join(paths(workdir)["runs"], check_run_name(run))


def existing_runs(workdir):
    folder = paths(workdir)["runs"]
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
        if os.path.isdir(folder) else []


# ============================================================================ dataset
def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def dataset_record(pairs, items, rendering, kind, opinion_items=None):
    """What ``dataset.json`` holds: enough to rebuild the pairs of any seed without the source."""
    record = {"kind": kind, "source": pairs.source, "groups": list(pairs.groups),
              "conversational": bool(pairs.conversational), "rendering": rendering.describe(),
              "skipped": pairs.skipped.astype(str).to_dict(orient="records"),
              "items": [{"prompt": p, "candidates": list(c), "targets": _jsonable(t)}
                        for p, c, t in zip(items["prompt"], items["candidates"], items["targets"])]}
    if kind == "global_opinions":
        table = opinion_items.table.assign(probs=opinion_items.table["probs"].map(list))
        record["opinion_items"] = table.to_dict(orient="records")
    else:
        table = pairs.table.copy()
        for col in table.columns:
            table[col] = table[col].map(_jsonable)
        record["pairs"] = table.to_dict(orient="records")
    return record


def save_workdir(workdir, features, theta_ref, record, spec, force=False):
    """Write features (atomically, with their SHA-256) and the dataset; refuse to replace features
    that runs were trained on, unless ``force`` (then the old runs move to ``runs-<old sha>/``)."""
    from safetensors.numpy import save_file
    os.makedirs(workdir, exist_ok=True)
    p = paths(workdir)
    tensors = dict(features.arrays(), theta_ref=np.asarray(theta_ref))
    data_hash = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    tmp = p["features"] + ".new"
    save_file(tensors, tmp, metadata={"model": json.dumps(spec)})
    make_readable(tmp)
    new_sha = sha256_file(tmp)
    runs = existing_runs(workdir)
    if os.path.exists(p["features"]) and runs:
        old_sha = features_sha(workdir)
        if old_sha != new_sha:
            if not force:
                os.remove(tmp)
                raise ValueError(f"{workdir} holds {len(runs)} run(s) trained on other features (another model "
                                 f"or data); extract into another --workdir, or pass --force to keep them as "
                                 f"runs-{old_sha[:8]}/ and start afresh")
            shutil.move(p["runs"], os.path.join(workdir, f"runs-{old_sha[:8]}"))
    os.replace(tmp, p["features"])

    def write_json(path, obj):
        def write(t):
            with open(t, "w") as fh:
                json.dump(obj, fh, indent=1, default=str)
        atomic_write(path, write)

    write_json(p["dataset"], record)
    write_json(p["features_meta"], {"sha256": new_sha, "model": spec, "dataset_sha256": data_hash})
    return new_sha


def features_sha(workdir):
    """The recorded SHA-256 of the features, checked against the file (``ValueError`` if they differ)."""
    p = paths(workdir)
    if not os.path.exists(p["features"]):
        raise FileNotFoundError(f"{p['features']} not found: run `python -m llm_head extract` first")
    try:
        with open(p["features_meta"]) as fh:
            recorded = json.load(fh)["sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{p['features_meta']} is missing or unreadable ({exc}); extract again") from None
    actual = sha256_file(p["features"])
    if actual != recorded:
        raise ValueError(f"{p['features']} does not match its recorded checksum (corrupt or edited); extract again")
    return actual


#: safetensors dtype codes that numpy reads natively
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "U8": np.uint8}


def memmap_tensor(path, name):
    """One tensor of a ``.safetensors`` file as a read-only ``numpy.memmap`` (the format: an 8-byte
    little-endian header length, a JSON header with each tensor's dtype, shape and byte range, then
    the raw data)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    entry = header.get(name)
    if entry is None:
        raise KeyError(f"{path} has no tensor {name!r}")
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which numpy cannot map")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: tensor {name!r} has a byte range that does not match its shape")
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + size + begin, shape=shape)


def load_workdir(workdir, mmap=False):
    """(features, θ_ref, dataset record, model spec, features SHA-256) of a work folder. ``mmap=True``
    leaves the hidden states on disk (a read-only memmap, read block by block by the implicit S)."""
    from safetensors import safe_open
    p = paths(workdir)
    sha = features_sha(workdir)
    with safe_open(p["features"], framework="numpy") as fh:
        tensors = {k: (memmap_tensor(p["features"], k) if mmap and k == "hidden" else fh.get_tensor(k))
                   for k in fh.keys()}
        spec = json.loads((fh.metadata() or {}).get("model", "{}"))
    with open(p["dataset"]) as fh:
        record = json.load(fh)
    return LastLayerFeatures.from_arrays(tensors), tensors["theta_ref"], record, spec, sha


def items_table(record):
    return pd.DataFrame(record["items"], columns=["prompt", "candidates", "targets"])


def pairs_for_seed(record, seed=0, split_by=None):
    """The pairs of one seed, with their split: GlobalOpinionQA redraws the rejected options and its
    80/10/10 split per country (``split_by`` = ``"item"`` or ``"question"``); other data keep their
    pairs, and their ``split`` column or a seeded split by prompt (or by the column ``split_by``)."""
    if record["kind"] == "global_opinions":
        from .opinions import OpinionItems, opinion_pairs
        table = pd.DataFrame(record["opinion_items"])
        table["probs"] = table["probs"].map(np.asarray)
        items = OpinionItems(table=table, countries=tuple(record["groups"]), skipped=pd.DataFrame())
        pairs = opinion_pairs(items, seed=seed, split_by=split_by or "item")
    else:
        pairs = PreferencePairs(table=pd.DataFrame(record["pairs"]), groups=tuple(record["groups"]),
                                conversational=record["conversational"], source=record["source"])
        pairs.table["split"] = assign_splits(pairs, seed=seed, split_by=split_by).to_numpy()
    return pairs


def load_problem(workdir, seed=0, split_by=None, storage="auto"):
    """The :class:`~llm_head.train.HeadProblem` of a work folder for one seed, and the dataset record.
    ``storage`` (``"auto"``, ``"csr"``, ``"implicit"``): how S is held (:func:`llm_head.features.pair_rows`);
    with ``"implicit"`` the hidden states stay memory-mapped."""
    from .train import HeadProblem
    features, theta_ref, record, _, sha = load_workdir(workdir, mmap=storage == "implicit")
    items = items_table(record)
    pairs = pairs_for_seed(record, seed, split_by)
    index = pair_indices(pairs.table, items, pairs.groups).assign(split=pairs.table["split"].to_numpy())
    targets = list(items["targets"]) if items["targets"].notna().all() else None
    problem = HeadProblem(features, index, theta_ref, list(pairs.groups), item_probs=targets, features_sha256=sha,
                          storage=storage)
    return problem, record


def check_run(workdir, run):
    """The settings of a run, after checking it was trained on this folder's features."""
    folder = run_dir(workdir, run)
    settings_path = os.path.join(folder, "settings.json")
    if not os.path.exists(settings_path):
        raise FileNotFoundError(f"no run {run!r} in {workdir} (runs: {existing_runs(workdir)})")
    with open(settings_path) as fh:
        settings = json.load(fh)
    current = features_sha(workdir)
    trained_on = settings.get("features_sha256")
    if trained_on != current:
        raise ValueError(f"run {run!r} was trained on other features (sha {str(trained_on)[:12]}…) than this "
                         f"folder holds now ({current[:12]}…): re-train it, or use the work folder it was "
                         "trained in")
    return settings

