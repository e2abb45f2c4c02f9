"""Archive and quarantine moves that never lose the source, and finish after a crash.

On one filesystem a move is a rename (atomic). Across filesystems the file is copied to a
``.partial`` name, fsynced, checked for size, renamed into place, and only then is the
source unlinked: a crash at any point leaves at least one complete copy.

A folder's whole archive step (every move with its exact target, every quarantine reason,
the receipt) is first written down as a plan in STATE_DIR; carrying it out is idempotent,
so the run after a crash simply carries the same plan out again: each file ends up
archived exactly once, no `.partial` is left, no quarantined file lacks its reason, and no
archived folder lacks its receipt.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_P = TypeVar("_P", str, Path)


class ArchiveError(OSError):
    """A move failed; the source is untouched."""


def move_file(source: Path, target: Path) -> Path:
    """Move source to target (or target.1, target.2… if taken); return where it went."""
    target = free_name(target)
    try:
        if not os.path.lexists(source):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(source))
        _move_exact(source, target)
    except OSError as exc:
        raise ArchiveError(exc.errno, f"cannot move {source} to {target}: {exc.strerror}") from None
    return target


def free_name(target: _P, taken: set[_P] | None = None) -> _P:
    """target, or target.1, target.2… : the first name not on disk (nor in taken). A str
    in, a str out: a 20,000-file folder's targets as Paths cost ~20 MB."""
    candidate, n = target, 0
    while os.path.lexists(candidate) or (taken is not None and candidate in taken):
        n += 1
        candidate = type(target)(f"{os.fspath(target)}.{n}")
    return candidate


def _copy_then_unlink(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with open(source, "rb") as src, open(partial, "wb") as dst:
            before = os.fstat(src.fileno())
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        after = os.lstat(source)
        if (after.st_ino, after.st_size, after.st_mtime_ns) != (
                before.st_ino, before.st_size, before.st_mtime_ns):
            raise OSError(errno.EAGAIN, "the file changed while being copied")
        if os.path.getsize(partial) != after.st_size:
            raise OSError(errno.EIO, "copy is incomplete")
        shutil.copystat(source, partial)
        os.rename(partial, target)
        fsync_dir(target.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    os.unlink(source)


def fsync_dir(path: Path) -> None:
    """A directory's entries on disk (after a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


REASON_SUFFIX = ".reason.txt"


def write_reason(target: Path, text: str) -> Path:
    """A human-readable reason beside a quarantined file (complete or absent, never empty)."""
    reason = target.with_name(target.name + REASON_SUFFIX)
    reason.parent.mkdir(parents=True, exist_ok=True)
    partial = reason.with_name(reason.name + ".partial")
    try:
        partial.write_text(text.rstrip("\n") + "\n", encoding="utf-8",
                           errors="backslashreplace")
        os.replace(partial, reason)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
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
        if source.name.endswith(REASON_SUFFIX) or source.is_symlink():
            continue
        parts = source.relative_to(failed_dir).parts  # (<ts>, <folder>, *rel)
        if len(parts) < 3:
            continue
        restored.append(move_file(source, import_dir.joinpath(*parts[1:])))
        Path(str(source) + REASON_SUFFIX).unlink(missing_ok=True)
    if path.is_dir():
        remove_empty_dirs(path)
    return restored


# --- the write-ahead plan of a folder's archive step ---------------------------------------


@dataclass
class Plan:
    """Everything one folder's archive step does, decided before anything moves."""

    folder: str = ""  # the import folder it belongs to (its lock guards the plan)
    moves: list[tuple[str, str]] = field(default_factory=list)  # (source, exact target)
    reasons: dict[str, str] = field(default_factory=dict)  # quarantine target -> reason
    receipt_path: str | None = None
    receipt: dict[str, Any] | None = None  # all of it but its files
    # The receipt's files, (target, entry) each ("" : the file is there already), written
    # beside the plan a line each and read back one at a time: a 20,000-file folder's
    # entries held at once cost ~30 MB.
    entries: Iterable[tuple[str, dict[str, Any]]] | None = None
    entries_file: str | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.entries is not None:
            self.entries_file = str(_entries_path(path))
            _write_durably(Path(self.entries_file), (
                json.dumps({"target": target, **entry}) + "\n"
                for target, entry in self.entries))
        content = {"folder": self.folder, "moves": self.moves, "reasons": self.reasons,
                   "receipt_path": self.receipt_path, "receipt": self.receipt,
                   "entries_file": self.entries_file}
        _write_durably(path, _json_pieces(content, ensure_ascii=True))

    @classmethod
    def load(cls, path: Path) -> Plan | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        plan = cls(data["folder"], [tuple(m) for m in data["moves"]], data["reasons"],
                   data["receipt_path"], data["receipt"], None, data.get("entries_file"))
        if plan.receipt is not None and "files" in plan.receipt:  # a plan of an earlier
            # release, its entries inline: written beside it as this release keeps them
            plan.entries = ((e.pop("target", ""), e) for e in plan.receipt.pop("files"))
            plan.save(path)
        return plan

    @staticmethod
    def remove(path: Path) -> None:
        """The step is done: its plan and its entries go."""
        path.unlink(missing_ok=True)
        _entries_path(path).unlink(missing_ok=True)


def _entries_path(plan_file: Path) -> Path:
    return plan_file.with_name(plan_file.stem + ".files.jsonl")


def _write_durably(path: Path, pieces: Iterable[str]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as fh:
        for piece in pieces:
            fh.write(piece)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _placed_entries(entries_file: str) -> Iterator[dict[str, Any]]:
    """The receipt's entries whose files got to their targets, read one at a time."""
    with open(entries_file, encoding="utf-8") as fh:
        for line in fh:
            entry = json.loads(line)
            target = entry.pop("target", "")
            if not target or os.path.exists(target):
                yield entry


@dataclass
class PlanResult:
    moved: list[str] = field(default_factory=list)  # sources now at their target
    failed: dict[str, str] = field(default_factory=dict)  # source -> why it stays
    receipt_error: str | None = None


def carry_out(plan: Plan) -> PlanResult:
    """Do (or finish) what the plan says; safe to repeat after a crash at any point."""
    outcome = PlanResult()
    for source, target in plan.moves:
        reason = plan.reasons.get(target)
        try:
            if reason is not None and not os.path.exists(target + REASON_SUFFIX):
                write_reason(Path(target), reason)  # first: never a quarantined file without
            _move_exact(Path(source), Path(target))
        except OSError as exc:
            outcome.failed[source] = exc.strerror or str(exc)
            continue
        outcome.moved.append(source)
    if plan.receipt_path and plan.receipt is not None and plan.entries_file:
        try:
            placed = _placed_entries(plan.entries_file)
            first = next(placed, None)
            if first is not None:
                _write_json(Path(plan.receipt_path),
                            {**plan.receipt, "files": itertools.chain([first], placed)})
        except OSError as exc:
            outcome.receipt_error = exc.strerror or str(exc)
    return outcome


def _move_exact(source: Path, target: Path) -> None:
    """Move source to exactly target. Already done (source gone, target there): nothing.
    Copied but not yet unlinked (a crash across filesystems): unlink the source."""
    partial = target.with_name(target.name + ".partial")
    if not os.path.lexists(source):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        return
    if os.path.lexists(target):
        if os.path.getsize(target) == os.path.getsize(source):
            os.unlink(source)  # the copy is complete: only the unlink was missing
            return
        raise OSError(errno.EEXIST, f"{target} exists and differs from {source}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # a copy interrupted earlier
    try:
        try:
            os.rename(source, target)
        except FileNotFoundError:  # the target's directory does not exist yet
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_then_unlink(source, target)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """A receipt, laid out one line per key and per file (see _write_json_to)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8", errors="surrogateescape") as fh:
            for piece in _json_pieces(content):
                fh.write(piece)
            fh.write("\n")
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


# Lists written an item a line: a folder's moves and its receipt's files.
_ONE_PER_LINE = ("files", "moves")


def _json_pieces(content: dict[str, Any], *, ensure_ascii: bool = False) -> Iterator[str]:
    """JSON as it is written, each piece by the C encoder (json's indent= and json.dump use
    its pure-Python one): for a 20,000-file folder no 20 MB string and no list of a million
    fragments, and a receipt a person can read line by line."""
    encode = json.JSONEncoder(ensure_ascii=ensure_ascii).encode  # one, not one per item
    yield "{"
    for index, (key, value) in enumerate(content.items()):
        yield ("," if index else "") + "\n " + encode(key) + ": "
        if key in _ONE_PER_LINE and isinstance(value, list | Iterator):
            yield "["
            for number, item in enumerate(value):
                yield ("," if number else "") + "\n  " + encode(item)
            yield "\n ]"
        elif isinstance(value, dict) and key == "receipt":
            yield from _json_pieces(value, ensure_ascii=ensure_ascii)
        else:
            yield encode(value)
    yield "\n}"
