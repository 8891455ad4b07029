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
left by a dead process on this host is taken over). The lock appears whole or not at all (written to a
temporary file, then hard-linked into place, which fails if it exists), so exactly one of many runs
started together gets it; a lock file that cannot be parsed is treated as held and never removed (the
error names it: delete it by hand if no run uses the checkpoint). A Ctrl-C saves the state before re-raising. A
damaged file — truncated, overwritten, not a checkpoint at all — raises one ``ValueError`` naming
it. Temp files of this checkpoint left by a killed run are removed on the next start.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import socket
import time
import warnings
import zipfile

import numpy as np

from ._io import atomic_write

FORMAT = 2
#: settings that stop a run but do not change its iterates (left out of the fingerprint)
STOPPING = ("steps", "tol", "check_every")


def _host_tag():
    """A short tag of this host for file names (host names may hold any character)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _since(holder):
    try:
        return time.ctime(float(holder.get("since", 0)))
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


def data_fingerprint(data):
    """SHA-256 of every number that defines the data: S (all of it, as its adapter feeds it:
    :meth:`~loglinear_grpo.storage.Rows.update_fingerprint`), r, the labels, K."""
    h = hashlib.sha256()
    h.update(json.dumps([int(data.n_samples), int(data.dim), int(data.n_groups)]).encode())
    data.storage.update_fingerprint(h)
    h.update(data.membership.fingerprint_bytes())
    h.update(np.ascontiguousarray(data.ref_margin, dtype=np.float64).tobytes())
    return h.hexdigest()


class Fingerprint(str):
    """The run's SHA-256 (a str), carrying the settings it hashes (``settings``), so that a mismatch can
    be explained setting by setting."""

    settings: dict


def run_fingerprint(data, config):
    """What a checkpoint must match: the settings that change the iterates, θ⁽⁰⁾ and the data."""
    settings = {k: v for k, v in config.describe().items() if k not in STOPPING}
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    theta0 = np.ascontiguousarray(config.theta0, dtype=np.float64)
    h.update(theta0.tobytes())
    data_digest = data_fingerprint(data)
    h.update(data_digest.encode())
    out = Fingerprint(h.hexdigest())
    out.settings = {**settings, "theta0": hashlib.sha256(theta0.tobytes()).hexdigest()[:16], "data": data_digest[:16],
                    "theory_steps": bool(config.theory)}
    return out


def explain_mismatch(stored, current):
    """Which settings differ between a checkpoint's run and this one, and why it cannot continue."""
    if not stored or not current:
        return ("the data, Θ, θ⁽⁰⁾, the loss, β, the method, the seed or the step sizes differ (the checkpoint "
                "predates the record that would say which)")
    names = {"data": "the data (S, r or the groups)", "theta0": "θ⁽⁰⁾", "constraint": "Θ"}
    diff = [f"{names.get(k, k)}: {stored.get(k)!r} then, {current.get(k)!r} now"
            for k in sorted(set(stored) | set(current)) if k != "theory_steps" and stored.get(k) != current.get(k)]
    text = "; ".join(diff) if diff else "the settings' record matches, the hash does not (a different format)"
    steps_differ = any(k in ("step_size", "alpha_step_size") and stored.get(k) != current.get(k)
                       for k in set(stored) | set(current))
    if steps_differ and (stored.get("theory_steps") or current.get("theory_steps")):
        text += (". The 'theory' step sizes depend on T = steps (Proposition 3's η ∝ 1/√T), so a run that uses "
                 "them cannot be extended by a larger steps: give step_size and alpha_step_size as numbers (or "
                 "schedules) to make a run extendable")
    return text


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
        self.lock_temp_prefix = f".{name}.lock-tmp-"
        self._locked = False
        self._me = None

    # -- locking ------------------------------------------------------------------
    def acquire(self):
        """Take ``<path>.lock``; a lock of a live process raises, a dead one's (same host) is taken over.

        The lock's contents (pid, host, time, a random token) are written to a temporary file first and
        made visible with ``os.link``, which fails if the lock exists: a reader never sees a partial
        lock. A lock file that cannot be parsed is never removed (it is treated as held). A stale lock is
        removed only under ``<path>.lock.takeover`` (taken the same way), after checking that it is
        still the stale one, so two runs cannot both take it over."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "token": secrets.token_hex(8)}
        for _ in range(20):
            if self._create(self.lock_path, me):
                self._locked, self._me = True, me
                self._remove_stale_temps()
                return self
            holder = self._holder(self.lock_path)
            if holder is None:                 # released in between: try again
                continue
            if self._alive(holder):
                raise ValueError(
                    f"checkpoint {self.path} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {_since(holder)}); wait for it, or give "
                    f"this run another checkpoint path")
            if not self._take_over(holder):    # another run is taking the stale lock over: look again soon
                time.sleep(0.05)
        raise ValueError(f"could not lock checkpoint {self.path}: its lock {self.lock_path} changed hands "
                         "while this run tried to take it; try again")

    def _create(self, path, contents):
        """Make ``path`` hold ``contents`` (JSON) if it does not exist, atomically: True, or False if it
        exists. ``os.link`` of a complete temporary file; where the file system has no hard links,
        ``O_EXCL`` (the file is then empty for an instant, which readers wait out)."""
        folder, name = os.path.split(path)
        tmp = os.path.join(folder, f"{self.lock_temp_prefix}{_host_tag()}-{os.getpid()}-{contents['token']}")
        with open(tmp, "w") as fh:
            json.dump(contents, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:                        # pragma: no cover - no hard links here (e.g. FAT, some shares)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(contents, fh)
            return True
        finally:
            try:
                os.remove(tmp)
            except FileNotFoundError:          # pragma: no cover
                pass

    def _take_over(self, stale):
        """Remove the lock of a dead process, if it is still ``stale``, holding ``<lock>.takeover``: True,
        or False when another run holds that guard."""
        guard = self.lock_path + ".takeover"
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "token": secrets.token_hex(8)}
        if not self._create(guard, mine):
            holder = self._holder(guard)
            if holder is None or self._alive(holder):
                return False                   # another run is taking it over (or just did)
            raise ValueError(f"checkpoint {self.path}: {guard} was left by process {holder.get('pid')}, which no "
                             f"longer runs, while it took over a stale lock; if no run uses this checkpoint, "
                             f"delete {guard} and {self.lock_path} and try again")
        try:
            if self._holder(self.lock_path, wait=False) == stale:
                warnings.warn(f"removing the stale lock {self.lock_path} of process {stale.get('pid')}, which no "
                              "longer runs", stacklevel=4)
                try:
                    os.remove(self.lock_path)
                except FileNotFoundError:
                    pass
        finally:
            try:
                os.remove(guard)
            except FileNotFoundError:          # pragma: no cover
                pass
        return True

    def release(self):
        """Remove the lock, if it is still this run's."""
        if self._locked:
            try:
                if self._holder(self.lock_path, wait=False) == self._me:
                    os.remove(self.lock_path)
            except (FileNotFoundError, ValueError):
                pass
            self._locked = False

    def _holder(self, path, wait=True):
        """The lock's contents (a dict), or ``None`` if it does not exist; ``ValueError`` naming the file
        when it cannot be parsed (after waiting up to about 0.5 s for a writer without hard links)."""
        for attempt in range(6 if wait else 1):
            try:
                with open(path) as fh:
                    text = fh.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                problem = f"cannot be read ({exc.strerror})"
            else:
                try:
                    holder = json.loads(text)
                    if isinstance(holder, dict):
                        return holder
                    problem = "does not hold a lock record"
                except ValueError:
                    problem = "is empty" if not text.strip() else "is not a lock record (not JSON)"
            if attempt < (5 if wait else 0):
                time.sleep(0.1)
        raise ValueError(f"checkpoint {self.path} is locked by {path}, which {problem}; it is treated as held "
                         f"and left alone. If no run is using this checkpoint, delete {path} and try again")

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
        folder = os.path.dirname(self.path)
        for tmp in glob.glob(os.path.join(folder, glob.escape(self.temp_prefix) + "*")):
            try:
                os.remove(tmp)
            except OSError:                   # pragma: no cover - another process's permissions
                pass
        # a lock's temporary file lives for an instant; one left by a process killed then (this host only)
        for tmp in glob.glob(os.path.join(folder, glob.escape(f"{self.lock_temp_prefix}{_host_tag()}-") + "*")):
            try:
                pid = int(os.path.basename(tmp)[len(self.lock_temp_prefix) + 9:].split("-")[0])
            except ValueError:
                continue
            if not self._alive({"host": socket.gethostname(), "pid": pid}):
                try:
                    os.remove(tmp)
                except OSError:               # pragma: no cover - removed by another run, or permissions
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
                         history=np.array(json.dumps(history_rows)), format=np.int64(FORMAT),
                         settings=np.array(json.dumps(getattr(fingerprint, "settings", {}))))
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
                stored_settings = json.loads(str(z["settings"])) if "settings" in z.files else None
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
                json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"checkpoint {self.path} is damaged or not a checkpoint ({type(exc).__name__}: "
                             f"{str(exc)[:80]}); delete it to start afresh") from None
        if stored != fingerprint:
            why = explain_mismatch(stored_settings, getattr(fingerprint, "settings", None))
            raise ValueError(f"checkpoint {self.path} was written for other data or settings ({why}); delete it or "
                             "choose another path")
        if not all(np.all(np.isfinite(a)) for a in (state.theta, state.theta_sum, state.alpha_sum)):
            raise ValueError(f"checkpoint {self.path} holds non-finite numbers; delete it to start afresh")
        return state, rows
