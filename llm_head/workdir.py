"""The work folder of ``python -m llm_head``: features with a checksum, the data they were made from,
and the runs trained on them — kept consistent.

Layout::

    <workdir>/features.safetensors        the merged features and θ_ref (+ features.safetensors.json:
                                          its SHA-256, the model spec, the data fingerprint)
    <workdir>/dataset.json                the pairs (or GlobalOpinionQA items), groups, rendering
    <workdir>/runs/<run>/                 theta.npy, history.csv, settings.json (with the features'
                                          SHA-256), metrics_<split>.csv, groups.png, model/
    <workdir>/cache/                      the extraction cache (shards)

Rules: features are written atomically with their checksum; extracting *different* features, or a
different dataset record (other pairs or groups: :func:`dataset_sha`), into a folder that already has
runs is refused (``force=True`` versions the old runs as ``runs-<old sha>/``); a run records the
checksums of the features and of the dataset it was trained on and :func:`check_run` refuses to
evaluate or export it against others; run names are plain names that cannot leave the folder.

A run is trained into ``runs/.train-<run>/run/`` under a reservation made atomically by
``os.mkdir(runs/.train-<run>)`` (:func:`training_run`): a second ``train`` of the same name is refused
while the first holds it, and the finished folder is renamed (swapped, with ``--overwrite``) onto
``runs/<run>`` only when complete, so ``runs/<run>/`` is always a whole run. What an interrupted
``train`` leaves (a reservation of a process that is gone; a run folder without ``settings.json``,
written by older versions) is a *partial run*: :func:`partial_runs` names it, :func:`existing_runs`
ignores it, ``train --overwrite`` removes it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import warnings
from contextlib import contextmanager

try:
    import fcntl
except ImportError:                              # not POSIX: reservations fall back to the owner's pid
    fcntl = None

import numpy as np
import pandas as pd

from loglinear_grpo._io import atomic_write, make_readable, sha256_file

from .data import PreferencePairs, assign_splits, pair_indices
from .features import LastLayerFeatures

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")
#: prefix of the reservation folder ``runs/.train-<run>/`` of a run being trained
RESERVATION_PREFIX = ".train-"
#: the file, written last, that makes a run folder a complete run
RUN_MARKER = "settings.json"
#: seconds a reservation without its owner record counts as being set up (then: left behind)
RESERVATION_GRACE_S = 60.0


class RunBusyError(ValueError):
    """Another process is training a run of this name now."""


def paths(workdir):
    return {"features": os.path.join(workdir, "features.safetensors"),
            "features_meta": os.path.join(workdir, "features.safetensors.json"),
            "dataset": os.path.join(workdir, "dataset.json"), "runs": os.path.join(workdir, "runs"),
            "cache": os.path.join(workdir, "cache")}


def check_run_name(name):
    """A run name is a plain file name (letters, digits, ``._+=-``, the whole name): never a path out of
    the folder, nor a name with a trailing newline."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"--run must be a plain name (letters, digits and ._+=-, at most 128 characters), "
                         f"got {name!r}")
    return name


def check_output_folder(path, flag):
    """Check, before any work, that ``path`` is a folder or can be made one: it and every existing
    parent must be folders, the nearest existing one writable.

    Parameters
    ----------
    path : str
        The folder a command will write to.
    flag : str
        The flag that gave it (for the message), e.g. ``"--workdir"``.

    Raises
    ------
    ValueError
        One line naming ``flag`` and the path.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"cannot be made: {probe} is a file"
        raise ValueError(f"{flag} {path} {what}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not writable")
    return path


def run_dir(workdir, run):
    return os.path.join(paths(workdir)["runs"], check_run_name(run))


def reservation_dir(workdir, run):
    """``runs/.train-<run>/``: held while ``run`` is trained (see :func:`training_run`)."""
    return os.path.join(paths(workdir)["runs"], RESERVATION_PREFIX + check_run_name(run))


def existing_runs(workdir):
    """The complete runs of a work folder (folders ``runs/<name>/`` with their ``settings.json``);
    partial ones (:func:`partial_runs`) are left out."""
    folder = paths(workdir)["runs"]
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if RUN_NAME.fullmatch(d)
                  and os.path.isfile(os.path.join(folder, d, RUN_MARKER)))


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                      # someone else's process: alive
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _owner(folder):
    """Who made a reservation, for messages (``owner.json``: pid, host, start time)."""
    try:
        with open(os.path.join(folder, "owner.json")) as fh:
            owner = json.load(fh)
        return int(owner["pid"]), str(owner["host"]), str(owner.get("started", "?"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lock(folder, create=False):
    """Take the reservation's lock (``flock`` of ``<folder>/lock``, held by the training process for its
    lifetime and released by the system however it ends) without waiting.

    Returns the open descriptor (the caller holds the lock), or ``None`` when a live process holds it.
    Raises ``FileNotFoundError`` when there is no lock file (and ``create`` is false)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(os.path.join(folder, "lock"), flags, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reservation_state(folder, keep_lock=False):
    """``(live, description, fd)`` of a reservation folder. Live while its owner holds the lock (or, for
    a reservation younger than :data:`RESERVATION_GRACE_S`, before it has one); otherwise left behind by
    an interrupted ``train``, and with ``keep_lock`` its lock is returned held (``fd``; ``None`` when it
    has no lock file)."""
    owner = _owner(folder)
    who = f"process {owner[0]} on {owner[1]} since {owner[2]}" if owner else "a process that left no owner record"
    fd = None
    try:
        if fcntl is None:                        # no flock here: the owner's pid says whether it runs
            if owner is None:
                raise FileNotFoundError(folder)
            live = owner[1] != socket.gethostname() or _process_alive(owner[0])
        else:
            fd = _lock(folder)
            live = fd is None
    except FileNotFoundError:
        try:
            age = time.time() - os.stat(folder).st_mtime
        except FileNotFoundError:
            return False, f"{folder} (gone)", None
        live = age < RESERVATION_GRACE_S
        if live:
            return True, f"reserved {age:.0f} s ago by {who} ({folder})", None
    if live:
        deadline = time.monotonic() + 2.0
        while owner is None and time.monotonic() < deadline:      # its owner writes the record just after the lock
            time.sleep(0.05)
            owner = _owner(folder)
        who = f"process {owner[0]} on {owner[1]} since {owner[2]}" if owner else "a process starting now"
        return True, f"being trained now by {who} ({folder})", None
    if fd is not None and not keep_lock:
        os.close(fd)
        fd = None
    return False, f"{folder}: left by an interrupted train ({who}, no longer running)", fd


def partial_runs(workdir):
    """Partial runs of a work folder, ``{name: what is there}``: a reservation ``runs/.train-<name>/``
    (being trained now, or left by an interrupted ``train``), or a folder ``runs/<name>/`` without its
    ``settings.json`` (a write that stopped half-way, by versions that wrote runs in place)."""
    folder = paths(workdir)["runs"]
    found = {}
    if not os.path.isdir(folder):
        return found
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isdir(path):
            continue
        if entry.startswith(RESERVATION_PREFIX) and RUN_NAME.fullmatch(entry[len(RESERVATION_PREFIX):]):
            found[entry[len(RESERVATION_PREFIX):]] = _reservation_state(path)[1]
        elif RUN_NAME.fullmatch(entry) and not os.path.isfile(os.path.join(path, RUN_MARKER)):
            found[entry] = f"{path} has no {RUN_MARKER} (a write that stopped half-way)"
    return dict(sorted(found.items()))


def trains_running(workdir):
    """``{name: what}`` of the runs being trained in ``workdir`` now (their reservations are held)."""
    folder = paths(workdir)["runs"]
    running = {}
    for name in partial_runs(workdir):
        reservation = os.path.join(folder, RESERVATION_PREFIX + name)
        if os.path.isdir(reservation):
            live, what, _ = _reservation_state(reservation)
            if live:
                running[name] = what
    return running


def describe_runs(workdir):
    """``runs: [...]``, and the partial runs with what they are, for messages."""
    text = f"runs: {existing_runs(workdir)}"
    partial = partial_runs(workdir)
    if partial:
        text += "; partial runs (not usable; `train --run <name> --overwrite` replaces one): " + \
            "; ".join(f"{name!r}: {what}" for name, what in partial.items())
    return text


def _existing_run_refusal(workdir, run):
    """Why ``train`` without ``--overwrite`` must not write ``run`` (``None``: nothing is in its way)."""
    final = run_dir(workdir, run)
    if os.path.isfile(os.path.join(final, RUN_MARKER)):
        return (f"run {run!r} exists in {workdir}; choose another --run, or pass --overwrite to replace it (its "
                "old files, an exported model included, are replaced once the new run is complete)")
    if os.path.lexists(final):
        return (f"run {run!r} in {workdir} is a partial run ({final} has no {RUN_MARKER}: a write that stopped "
                "half-way); pass --overwrite to replace it, or choose another --run")
    return None


def check_can_train(workdir, run, overwrite=False):
    """Refuse early (before any work) to train ``run`` where it could not be written: a complete run
    of that name without ``overwrite``, a partial one without ``overwrite``, or a ``train`` of that name
    running now (:class:`RunBusyError`). :func:`training_run` checks again, atomically."""
    reservation = reservation_dir(workdir, run)
    if os.path.isdir(reservation):
        live, what, _ = _reservation_state(reservation)
        if live:
            raise RunBusyError(f"run {run!r} is {what}: wait for it to finish, or choose another --run")
        if not overwrite:
            raise ValueError(f"run {run!r} in {workdir} is a partial run ({what}); pass --overwrite to remove it "
                             "and train afresh, or choose another --run")
    if not overwrite:
        refusal = _existing_run_refusal(workdir, run)
        if refusal:
            raise ValueError(refusal)


def _reserve(workdir, run, overwrite):
    """Reserve ``run``: ``os.mkdir`` of ``runs/.train-<run>/`` (atomic: one process wins) and its lock,
    held until :func:`_release`. A reservation left by an interrupted ``train`` is taken over (its lock
    taken, its contents removed) with ``overwrite``, refused without. Returns ``(folder, fd)``."""
    reservation = reservation_dir(workdir, run)
    os.makedirs(paths(workdir)["runs"], exist_ok=True)
    for _ in range(3):
        fd = None
        try:
            os.mkdir(reservation)
        except FileExistsError:
            live, what, fd = _reservation_state(reservation, keep_lock=True)
            if live:
                raise RunBusyError(f"run {run!r} is {what}: wait for it to finish, or choose another --run") from None
            if not overwrite:
                if fd is not None:
                    os.close(fd)
                raise ValueError(f"run {run!r} in {workdir} is a partial run ({what}); pass --overwrite to remove "
                                 "it and train afresh, or choose another --run") from None
            try:
                if fd is None and fcntl is not None:     # left before it had a lock: the first to make one wins
                    fd = _lock(reservation, create=True)
            except FileExistsError:
                raise RunBusyError(f"run {run!r} is being taken over by another train ({reservation}): choose "
                                   "another --run") from None
            except FileNotFoundError:                    # removed meanwhile: reserve afresh
                continue
            if not os.path.isdir(reservation):
                _release(None, fd)
                continue
            for entry in os.listdir(reservation):        # the lock is ours: clear what the old train left
                if entry != "lock":
                    path = os.path.join(reservation, entry)
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        else:
            try:
                fd = _lock(reservation, create=True) if fcntl is not None else -1
            except BaseException:
                _release(reservation, None)
                raise
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}

        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(owner, fh)
        try:
            atomic_write(os.path.join(reservation, "owner.json"), write)
        except BaseException:
            _release(reservation, fd)
            raise
        return reservation, fd
    raise RunBusyError(f"run {run!r}: could not reserve {reservation} (other trains of that name keep "
                       "taking it); choose another --run")


def _release(reservation, fd):
    """Remove a reservation (and whatever it still holds), then drop its lock."""
    try:
        if reservation is not None:
            shutil.rmtree(reservation, ignore_errors=True)
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)


def _exchange(a, b):
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_tree(folder):
    """fsync every file under ``folder`` and the folders themselves (before it is published)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def training_run(workdir, run, overwrite=False):
    """Reserve ``run``, yield the folder to write it into, and publish it when the block completes.

    The reservation ``runs/.train-<run>/`` is made by ``os.mkdir`` (atomic): while it is held, another
    ``train`` of the same name is refused (:class:`RunBusyError`). The run is written into
    ``runs/.train-<run>/run/``; when the ``with`` block ends without an error that folder is renamed
    onto ``runs/<run>`` — with ``overwrite``, swapped atomically with the old run (Linux; elsewhere two
    renames), which is removed only then. On an error nothing is published, an old run is untouched,
    and the reservation is removed.

    Parameters
    ----------
    workdir : str
    run : str
        A plain run name (:func:`check_run_name`).
    overwrite : bool
        Replace a complete or partial run of that name (and remove a reservation left behind by an
        interrupted ``train``).

    Yields
    ------
    str
        The folder to write the run's files into (``settings.json`` last).

    Raises
    ------
    RunBusyError
        Another process is training ``run`` now.
    ValueError
        ``run`` exists, or is partial, and ``overwrite`` is false.
    """
    reservation, fd = _reserve(workdir, run, overwrite)
    try:
        if not overwrite:
            refusal = _existing_run_refusal(workdir, run)
            if refusal:
                raise ValueError(refusal)
        staged = os.path.join(reservation, "run")
        os.mkdir(staged)
        yield staged
        if not os.path.isfile(os.path.join(staged, RUN_MARKER)):
            raise RuntimeError(f"run {run!r} was not completed: no {RUN_MARKER} written")
        _fsync_tree(staged)
        final = run_dir(workdir, run)
        if os.path.lexists(final):
            if not overwrite:                             # only a process without a reservation could get here
                raise ValueError(_existing_run_refusal(workdir, run))
            if not _exchange(staged, final):
                os.rename(final, os.path.join(reservation, "replaced"))
                os.rename(staged, final)
        else:
            os.rename(staged, final)
    finally:
        _release(reservation, fd)                         # the old run (after a swap), or an unfinished one


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
    if pairs.groupings:                  # several group columns (absent for one: older records keep their sha)
        record["groupings"] = list(pairs.groupings)
        record["intersect"] = bool(pairs.intersect)
        record["small_cells"] = dict(pairs.small_cells)
    if kind == "global_opinions":
        table = opinion_items.table.assign(probs=opinion_items.table["probs"].map(list))
        record["opinion_items"] = table.to_dict(orient="records")
    else:
        table = pairs.table.copy()
        for col in table.columns:
            table[col] = table[col].map(_jsonable)
        record["pairs"] = table.to_dict(orient="records")
    return record


#: fields of a dataset record that do not change any run: where the data were read from, the time the
#: extraction took, the default ``--split-by`` of later ``train`` commands (each run records its own), and
#: the report of an intersection's small cells (what was merged or dropped shows in the groups and pairs)
INFORMATIONAL_RECORD_KEYS = ("source", "extraction_seconds", "split_by", "small_cells")


def dataset_sha(record):
    """SHA-256 of what in a dataset record a run depends on: the pairs (or GlobalOpinionQA items), the
    groups and their order, the prompts and candidates, the rendering — everything but
    :data:`INFORMATIONAL_RECORD_KEYS`. The same for a record and for ``dataset.json`` written from it.

    Parameters
    ----------
    record : dict
        A record of :func:`dataset_record` (or ``dataset.json`` as read back).

    Returns
    -------
    str
        64 hex digits.
    """
    plain = json.loads(json.dumps(record, default=str))          # as it reads back from dataset.json
    kept = {k: v for k, v in plain.items() if k not in INFORMATIONAL_RECORD_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_dataset(workdir):
    """The dataset record of a work folder (``dataset.json``); ``ValueError`` naming the file if it is
    missing or unreadable."""
    path = paths(workdir)["dataset"]
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is missing or unreadable ({exc}); extract again") from None


def _versioned_runs_folder(workdir, old_sha, old_data, changed):
    """A free name for the old runs: ``runs-<old features sha>`` (the features changed) or
    ``runs-<old features sha>-dataset-<old dataset sha>`` (the dataset only), numbered if taken."""
    base = os.path.join(workdir, f"runs-{old_sha[:8]}" if "features" in changed else
                        f"runs-{old_sha[:8]}-dataset-{(old_data or 'unknown')[:8]}")
    target, n = base, 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}-{n}"
    return target


#: what of the model spec is known before the model loads (the rest, e.g. the weights' fingerprint, after)
EARLY_SPEC_KEYS = ("model", "revision", "gguf_file", "dtype")



def _other_record(old_groups, old_data, record, new_sha, note=""):
    """The refusal's words for a work folder whose runs were trained on another dataset record."""
    groups = "" if old_groups == list(record["groups"]) else f": groups {old_groups} then, {list(record['groups'])} now"
    return (f"another dataset record (dataset.json sha {str(old_data)[:12]}…, new {new_sha[:12]}…{groups}"
            f"{';' + note.rstrip(';') if note else ''})")

def check_extract_target(workdir, record, spec=None, force=False):
    """Refuse, before the model loads, an extraction that :func:`save_workdir` would refuse after it:
    ``workdir`` holds runs and the new dataset record (:func:`dataset_sha`) or a known part of the model
    spec (:data:`EARLY_SPEC_KEYS`: model, revision, GGUF file, dtype — all in the features file's
    metadata, hence in its SHA-256) differs from the recorded one; with ``force``, refuse while runs are
    being trained. Whatever is not known before the extraction (the weights) is checked by
    :func:`save_workdir`, which stays the guard.

    Raises
    ------
    ValueError
        The message :func:`save_workdir` would give, before minutes of work.
    """
    p = paths(workdir)
    runs = existing_runs(workdir)
    if not (os.path.exists(p["features"]) and runs):
        return
    try:
        old_record = read_dataset(workdir)
        old_data, old_groups = dataset_sha(old_record), old_record.get("groups")
    except ValueError:
        old_record, old_data, old_groups = None, None, None
    try:
        with open(p["features_meta"]) as fh:
            old_spec = json.load(fh).get("model") or {}
    except (OSError, ValueError):
        old_spec = {}
    spec = spec or {}
    changed_model = [k for k in EARLY_SPEC_KEYS if k in spec and k in old_spec and spec[k] != old_spec[k]]
    changed_data = old_data != dataset_sha(record)
    if not (changed_model or changed_data):
        return
    if force:
        running = trains_running(workdir)
        if running:
            raise ValueError(f"{workdir}: run(s) {sorted(running)} are being trained now "
                             f"({'; '.join(running.values())}); wait for them before --force moves the runs")
        return
    # other prompts, candidates, rendering or truncation: other features too (as save_workdir would say)
    feature_keys = ("items", "rendering", "truncation")
    other_data = old_record is None or any(old_record.get(k) != json.loads(json.dumps(record.get(k), default=str))
                                           for k in feature_keys)
    if changed_model:
        what = "other features (another model: " + ", ".join(
            f"{k} {old_spec[k]!r} then, {spec[k]!r} now" for k in changed_model) + ")"
    elif other_data:
        what = "other features (another model or data: other prompts, candidates, rendering or truncation)"
    else:
        what = _other_record(old_groups, old_data, record, dataset_sha(record))
    raise ValueError(f"{workdir} holds {len(runs)} run(s) trained on {what}; extract into another "
                     "--workdir, or pass --force to keep the old runs in a runs-<sha>/ folder and start afresh")


def check_split_by(kind, pairs, split_by):
    """Check, right after the data are read, that ``--split-by`` names a column of the pairs
    (GlobalOpinionQA: ``"item"`` or ``"question"``), so a typo is refused before the model loads.

    Raises
    ------
    ValueError
        Naming the value and what is available.
    """
    if split_by is None:
        return
    if kind == "global_opinions":
        if split_by not in ("item", "question"):
            raise ValueError(f"--split-by {split_by!r}: GlobalOpinionQA splits by 'item' or 'question'")
        return
    columns = [str(c) for c in pairs.table.columns if c != "split"]
    if split_by not in pairs.table.columns:
        raise ValueError(f"--split-by {split_by!r}: no such column in the data; columns: {columns}")


def save_workdir(workdir, features, theta_ref, record, spec, force=False):
    """Write features (atomically, with their SHA-256) and the dataset; refuse to replace the features
    or the dataset record that runs were trained on (:func:`dataset_sha`: other pairs, or the same
    pairs under another grouping), unless ``force`` (then the old runs move to ``runs-<old sha>/``)."""
    from safetensors.numpy import save_file
    os.makedirs(workdir, exist_ok=True)
    p = paths(workdir)
    tensors = dict(features.arrays(), theta_ref=np.asarray(theta_ref))
    data_hash = dataset_sha(record)
    tmp = p["features"] + ".new"
    save_file(tensors, tmp, metadata={"model": json.dumps(spec)})
    make_readable(tmp)
    new_sha = sha256_file(tmp)
    runs = existing_runs(workdir)
    if os.path.exists(p["features"]) and runs:
        old_sha = features_sha(workdir)
        try:
            old_record = read_dataset(workdir)
            old_data, old_groups = dataset_sha(old_record), old_record.get("groups")
        except ValueError:
            old_data, old_groups = None, None
        changed = [what for what, same in (("features", old_sha == new_sha), ("dataset", old_data == data_hash))
                   if not same]
        if changed:
            if not force:
                os.remove(tmp)
                if "features" in changed:
                    what = "other features (another model or data)"
                else:
                    what = _other_record(old_groups, old_data, record, data_hash, " the features are the same;")
                target = os.path.basename(_versioned_runs_folder(workdir, old_sha, old_data, changed))
                raise ValueError(f"{workdir} holds {len(runs)} run(s) trained on {what}; extract into another "
                                 f"--workdir, or pass --force to keep them as {target}/ and start afresh")
            running = trains_running(workdir)
            if running:
                os.remove(tmp)
                raise ValueError(f"{workdir}: run(s) {sorted(running)} are being trained now "
                                 f"({'; '.join(running.values())}); wait for them before --force moves the runs")
            shutil.move(p["runs"], _versioned_runs_folder(workdir, old_sha, old_data, changed))
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
                                conversational=record["conversational"], source=record["source"],
                                groupings=tuple(record.get("groupings", ())),
                                intersect=bool(record.get("intersect", False)),
                                small_cells=dict(record.get("small_cells", {})))
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
    index = pair_indices(pairs.table, items, pairs.groups, pairs.union).assign(split=pairs.table["split"].to_numpy())
    targets = list(items["targets"]) if items["targets"].notna().all() else None
    problem = HeadProblem(features, index, theta_ref, list(pairs.groups), item_probs=targets, features_sha256=sha,
                          storage=storage)
    return problem, record


def check_run(workdir, run):
    """The settings of a complete run, after checking it was trained on this folder's features and
    dataset record.

    Parameters
    ----------
    workdir : str
    run : str

    Returns
    -------
    dict
        The run's ``settings.json``.

    Raises
    ------
    FileNotFoundError
        No complete run of that name (the message lists the runs, and names a partial one).
    ValueError
        The run was trained on other features, or on another dataset record (other pairs, or the same
        pairs under another grouping): the message names both checksums (and both groupings).
    """
    folder = run_dir(workdir, run)
    settings_path = os.path.join(folder, RUN_MARKER)
    if not os.path.isfile(settings_path):
        partial = partial_runs(workdir).get(run)
        if partial:
            raise FileNotFoundError(f"run {run!r} in {workdir} is a partial run, not usable ({partial}); train it "
                                    f"again with --run {run} --overwrite ({describe_runs(workdir)})")
        raise FileNotFoundError(f"no run {run!r} in {workdir} ({describe_runs(workdir)})")
    with open(settings_path) as fh:
        settings = json.load(fh)
    current = features_sha(workdir)
    trained_on = settings.get("features_sha256")
    if trained_on != current:
        raise ValueError(f"run {run!r} was trained on other features (sha {str(trained_on)[:12]}…) than this "
                         f"folder holds now ({current[:12]}…): re-train it, or use the work folder it was "
                         "trained in")
    record = read_dataset(workdir)
    data_now = dataset_sha(record)
    data_then = settings.get("dataset_sha256")
    if data_then is None:
        warnings.warn(f"run {run!r} records no dataset checksum (trained by an older version): whether this "
                      f"folder's dataset.json (groups {record.get('groups')}) is the one it was trained on "
                      "cannot be checked", stacklevel=2)
    elif data_then != data_now:
        raise ValueError(f"run {run!r} was trained on another dataset record (dataset sha {str(data_then)[:12]}…, "
                         f"groups {settings.get('groups')}) than this folder's dataset.json (sha {data_now[:12]}…, "
                         f"groups {record.get('groups')}), e.g. the same pairs re-extracted with another "
                         "--group-column: re-train it, or use the work folder it was trained in")
    return settings
