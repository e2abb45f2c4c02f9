"""Scratch directories under the import dir's work dir (decompressed copies for a send):
each is locked by the process that uses it, so a run removes those whose process is gone
(killed mid-send) and never one another importer is using. Found by the fault campaign
(chaos seed 219): a decompressed copy of a patient's image stayed in the share for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from importer.share import share_time

LOCK = ".lock"


@contextlib.contextmanager
def scratch_dir(work_root: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory, locked while in use, removed afterwards (with the work dir when
    nothing else is in it)."""
    work_root.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=work_root))
    with open(work / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work_root.rmdir()


def remove_stale(work_root: Path, prefix: str) -> None:
    """Remove the scratch directories whose process is gone (their lock is free)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(work_root):
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                with open(os.path.join(entry.path, LOCK)) as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:  # killed before it was locked, or being made now
                if not _older_than(entry.path, 60):
                    continue
            except OSError:  # locked: in use
                continue
            shutil.rmtree(entry.path, ignore_errors=True)


def _older_than(path: str, seconds: float) -> bool:
    try:
        # by the clock that stamped it (share_time), not ours: a step ahead would take a
        # directory being made now for one a killed run left
        return share_time(os.path.dirname(path)) - os.stat(path).st_mtime > seconds
    except OSError:
        return False
