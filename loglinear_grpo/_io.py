"""Atomic file writes and checksums, shared by the solver's checkpoints and llm_head's feature cache."""
from __future__ import annotations

import hashlib
import os
import tempfile


def atomic_write(path, write, prefix=".tmp-", suffix=""):
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto
    ``path``: a reader sees the old file or the whole new one, never a partial one. The temporary file
    is removed if ``write`` fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        make_readable(tmp)                 # mkstemp's (or a writer's) 0600 would hide shared files from others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def make_readable(path):
    """Give ``path`` the permissions a plain ``open(..., "w")`` would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def sha256_file(path):
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
