"""Checkpoints of the first-order solvers: what they hold, how they are checked, how they are written.

A checkpoint is the :class:`~loglinear_grpo.solver.SolverState` plus the history so far and a
*fingerprint* of everything that changes the iterates: the settings that enter the update (loss,
β, method, estimator, χ, seed, batch size, the resolved step sizes, Θ's defining parameters), θ⁽⁰⁾,
and the whole data set — every entry of S (streamed block by block; a memory-mapped S is never
loaded whole; an implicit S by its :meth:`~loglinear_grpo.operators.PairOperator.fingerprint`), r and
the group labels. The iteration budget and the stopping tolerance are *not*
in it: a finished run can be extended by resuming with a larger ``steps``, and continues exactly as
an uninterrupted longer run would (the counter-based sampler makes step t a pure function of
(seed, t)), as long as the step sizes do not depend on T — a ``"theory"`` step does, and changes
the fingerprint.

Writes are atomic (temp file beside the checkpoint, fsync, rename). A run holds ``<path>.lock``
while it writes: a second run on the same path fails at once with the holder's pid and host (a lock
left by a dead process on this host is taken over). A Ctrl-C saves the state before re-raising. A
damaged file — truncated, overwritten, not a checkpoint at all — raises one ``ValueError`` naming
it. Temp files of this checkpoint left by a killed run are removed on the next start.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
import warnings
import zipfile

import numpy as np

from ._io import atomic_write

FORMAT = 2
#: settings that stop a run but do not change its iterates (left out of the fingerprint)
STOPPING = ("steps", "tol", "check_every")


def data_fingerprint(data):
    """SHA-256 of every number that defines the data: S (all of it), r, the labels, K."""
    h = hashlib.sha256()
    h.update(json.dumps([int(data.n_samples), int(data.dim), int(data.n_groups)]).encode())
    diff = data.diff
    if data.is_operator:
        h.update(b"operator:" + diff.fingerprint().encode())
    elif data.is_sparse:
        csr = diff.tocsr()
        csr.sort_indices()
        for part in (csr.indptr, csr.indices, csr.data):
            h.update(str(part.dtype).encode())
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(str(diff.dtype).encode())
        step = max(1, (1 << 22) // max(1, diff.shape[1] * diff.dtype.itemsize))   # ~4 MiB blocks
        for start in range(0, diff.shape[0], step):
            h.update(np.ascontiguousarray(diff[start:start + step]).tobytes())
    h.update(np.ascontiguousarray(data.groups, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(data.ref_margin, dtype=np.float64).tobytes())
    return h.hexdigest()


def run_fingerprint(data, config):
    """What a checkpoint must match: the settings that change the iterates, θ⁽⁰⁾ and the data."""
    settings = {k: v for k, v in config.describe().items() if k not in STOPPING}
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(config.theta0, dtype=np.float64).tobytes())
    h.update(data_fingerprint(data).encode())
    return h.hexdigest()


class CheckpointFile:
    """One checkpoint path: checked before the first step, locked while the run writes to it."""

    def __init__(self, path):
        if path is None or not str(os.fspath(path)).strip():
            raise ValueError("checkpoint must be a non-empty file path")
        self.path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(self.path)
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint {self.path} is a folder: give a file path, e.g. {self.path}/run.npz")
        if not name:
            raise ValueError("checkpoint must name a file")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"checkpoint folder {folder} cannot be created: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint folder {folder} is not writable")
        self.temp_prefix = f".{name}.tmp-"
        self.lock_path = self.path + ".lock"
        self._locked = False

    # -- locking ------------------------------------------------------------------
    def acquire(self):
        """Take ``<path>.lock`` (O_EXCL); a lock of a live process raises, a dead one's is taken over."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise ValueError(
                        f"checkpoint {self.path} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} (since {time.ctime(holder.get('since', 0))}); wait for it, or give "
                        f"this run another checkpoint path") from None
                warnings.warn(f"removing the stale lock {self.lock_path} of a process that no longer runs",
                              stacklevel=3)
                try:
                    os.remove(self.lock_path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._locked = True
            self._remove_stale_temps()
            return self
        raise ValueError(f"could not lock checkpoint {self.path}")     # pragma: no cover - a race lost twice

    def release(self):
        if self._locked:
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
            self._locked = False

    def _holder(self):
        try:
            with open(self.lock_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder):
        if holder.get("host") != socket.gethostname():
            return True                       # another machine: assume it is running
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError, OverflowError):
            return True
        return True

    def _remove_stale_temps(self):
        for tmp in glob.glob(os.path.join(os.path.dirname(self.path), glob.escape(self.temp_prefix) + "*")):
            try:
                os.remove(tmp)
            except OSError:                   # pragma: no cover - another process's permissions
                pass

    # -- reading and writing --------------------------------------------------------------
    def exists(self):
        return os.path.exists(self.path)

    def save(self, state, history_rows, fingerprint):
        """Write the state atomically (temp file in the same folder, fsync, ``os.replace``)."""
        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, theta=state.theta, log_alpha=state.log_alpha, theta_sum=state.theta_sum,
                         alpha_sum=state.alpha_sum, step=np.int64(state.step), fingerprint=np.array(fingerprint),
                         history=np.array(json.dumps(history_rows)), format=np.int64(FORMAT))
        atomic_write(self.path, write, prefix=self.temp_prefix, suffix=".npz")

    def load(self, fingerprint, state_type):
        """``(state, history rows)``; one ``ValueError`` naming the file for any damage or mismatch."""
        keys = ("theta", "log_alpha", "theta_sum", "alpha_sum", "step", "fingerprint", "history")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ValueError(f"missing {missing}")
                stored = str(z["fingerprint"])
                state = state_type(theta=z["theta"].copy(), log_alpha=z["log_alpha"].copy(),
                                   theta_sum=z["theta_sum"].copy(), alpha_sum=z["alpha_sum"].copy(),
                                   step=int(z["step"]))
                rows = json.loads(str(z["history"]))
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
                json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"checkpoint {self.path} is damaged or not a checkpoint ({type(exc).__name__}: "
                             f"{str(exc)[:80]}); delete it to start afresh") from None
        if stored != fingerprint:
            raise ValueError(f"checkpoint {self.path} was written for other data or settings (the data, Θ, θ⁽⁰⁾, "
                             "the loss, β, the method, the seed or the step sizes differ); delete it or choose "
                             "another path")
        if not all(np.all(np.isfinite(a)) for a in (state.theta, state.theta_sum, state.alpha_sum)):
            raise ValueError(f"checkpoint {self.path} holds non-finite numbers; delete it to start afresh")
        return state, rows
