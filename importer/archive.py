"""Archive and quarantine moves that never lose the source.

On one filesystem a move is a rename (atomic). Across filesystems the file is copied to a
``.partial`` name, fsynced, checked for size, renamed into place, and only then is the
source unlinked: a crash at any point leaves at least one complete copy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class ArchiveError(OSError):
    """A move failed; the source is untouched."""


def move_file(source: Path, target: Path) -> Path:
    """Move source to target (or target.1, target.2… if taken); return where it went."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target = _free_name(target)
        try:
            os.rename(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_then_unlink(source, target)
    except OSError as exc:
        raise ArchiveError(exc.errno, f"cannot move {source} to {target}: {exc.strerror}") from None
    return target


def _free_name(target: Path) -> Path:
    candidate, n = target, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = target.with_name(f"{target.name}.{n}")
    return candidate


def _copy_then_unlink(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        if os.path.getsize(partial) != os.path.getsize(source):
            raise OSError(errno.EIO, "copy is incomplete")
        shutil.copystat(source, partial)
        os.rename(partial, target)
        _fsync_dir(target.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    os.unlink(source)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_reason(target: Path, text: str) -> Path:
    """A human-readable reason beside a quarantined file."""
    reason = target.with_name(target.name + ".reason.txt")
    reason.write_text(text.rstrip("\n") + "\n", encoding="utf-8", errors="backslashreplace")
    return reason


def remove_empty_dirs(top: Path) -> None:
    """Remove directories left empty under top (and top itself), never following links."""
    for dirpath, _dirnames, _files in os.walk(top, topdown=False, followlinks=False):
        with contextlib.suppress(OSError):  # not empty: something stays for later or a person
            os.rmdir(dirpath)


def restore_quarantined(path: Path, failed_dir: Path, import_dir: Path) -> list[Path]:
    """Put quarantined files (one file, a folder, or a whole batch) back into the import dir.

    ``FAILED_DIR/<ts>/<folder>/<rel>`` goes back to ``IMPORT_DIR/<folder>/<rel>``; its
    reason file is removed once the file is back. Returns where the files went.
    """
    path = path.resolve()
    failed_dir = failed_dir.resolve()
    if failed_dir not in path.parents:
        raise ArchiveError(errno.EINVAL, f"{path} is not inside FAILED_DIR {failed_dir}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    restored = []
    for source in files:
        if source.name.endswith(".reason.txt") or source.is_symlink():
            continue
        parts = source.relative_to(failed_dir).parts  # (<ts>, <folder>, *rel)
        if len(parts) < 3:
            continue
        restored.append(move_file(source, import_dir.joinpath(*parts[1:])))
        Path(str(source) + ".reason.txt").unlink(missing_ok=True)
    if path.is_dir():
        remove_empty_dirs(path)
    return restored
