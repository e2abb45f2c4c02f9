"""The batch's snapshot of the import dir: which folders, which files, and which of them
are settled (see share.py); one lock per folder so two importers never share one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from importer import dcmtk, progress
from importer.config import Settings
from importer.folders import Patient, display, parse_folder_name
from importer.logs import event, warn
from importer.model import Folder, SourceFile, folder_hash
from importer.share import Identity, SettleCheck, changed_since, identity
from importer.unpack import unpack_archives


def scan_import_dir(settings: Settings) -> tuple[list[tuple[str, Patient]], list[str]]:
    """Top-level folders that name a patient, and everything else (left where it is)."""
    matched: list[tuple[str, Patient]] = []
    unmatched: list[str] = []
    with os.scandir(settings.import_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith((".", "@")):  # our work dir, Synology's @eaDir, dotfiles
                continue
            patient = None
            if entry.is_dir(follow_symlinks=False):
                patient = parse_folder_name(entry.name, settings.folder_pattern)
            if patient is None:
                unmatched.append(entry.name)
            else:
                matched.append((entry.name, patient))
    return matched, unmatched


def warn_unmatched(names: list[str], quiet: set[str] | None = None) -> None:
    """One [WARN] per entry left alone; with quiet (watch), once per process, not per scan."""
    for name in names:
        if quiet is None or name not in quiet:
            warn("Pattern does not match: %s (left untouched, not sent)", display(name))
            if quiet is not None:
                quiet.add(name)


def list_files(top: Path) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Regular files under top; symlinks and special files are listed apart, untouched."""
    files: list[SourceFile] = []
    left: list[tuple[str, str]] = []
    top_path = os.fspath(top)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        # os.walk joins each directory to top, so a path's part below top is a slice (the
        # same as os.path.relpath, which costs half of a 50,000-file listing's CPU).
        under = relative_dir(dirpath, top_path)
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                left.append((under + name, "symbolic link, not followed"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = under + name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # vanished since the listing
            if stat.S_ISLNK(st.st_mode):
                left.append((rel, "symbolic link, not followed"))
            elif not stat.S_ISREG(st.st_mode):
                left.append((rel, "not a regular file"))
            elif "\n" in name or "\r" in name:
                left.append((rel, "file name contains a line break; rename it"))
            else:
                files.append(SourceFile(path, rel, Identity.of(st)))
    return files, left


def relative_dir(dirpath: str, top: str) -> str:
    """dirpath (top, or top joined to more by os.walk) below top, with a trailing
    separator ("" for top itself)."""
    if dirpath == top:
        return ""
    start = len(top) if top.endswith(os.sep) else len(top) + 1
    return dirpath[start:] + os.sep


_held_here = threading.local()  # .paths: the lock files this thread holds


@contextlib.contextmanager
def folder_lock(settings: Settings, name: str) -> Iterator[bool]:
    """An exclusive lock per folder in STATE_DIR; yields False if another process (or
    another thread of this one: each lock is its own open file) has it.

    Reentrant within a thread: a status-page resend holds the folder from its audit to the
    end of the batch it runs, and that batch takes the lock again."""
    if settings.dry_run:
        yield True
        return
    lock_dir = settings.state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = str(lock_dir / f"{folder_hash(name)}.lock")
    held: set[str] = _held_here.__dict__.setdefault("paths", set())
    if path in held:
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        held.add(path)
        try:
            yield True
        finally:
            held.discard(path)
    finally:
        os.close(fd)


# Files listed (and checked for the DICM magic) at a time: a backlog of 50,000 files is
# never all in memory at once, and the next group is listed while the previous one is sent.
GROUP_FILES = 2000


def listed_groups(settings: Settings, matched: list[tuple[str, Patient]],
                  locks: contextlib.ExitStack, *, taken: list[Folder], busy: list[str],
                  wait_for_settle: bool,
                  prepare: Callable[[str], None] | None) -> Iterator[list[Folder]]:
    """The batch's folders with what they hold, a group of about GROUP_FILES files at a
    time: each folder locked (or, held by another importer, named in busy), prepared (an
    interrupted run's work finished first), listed, its unsettled files set aside (those
    only too young, with wait_for_settle, waited for once per group), and appended to taken.

    Raises dcmtk.Stopped when told to stop during the wait."""
    settle = SettleCheck(settings.settle_seconds, share=settings.import_dir)
    group: list[Folder] = []
    young: list[tuple[Folder, SourceFile]] = []
    count = 0
    for name, patient in matched:
        if not locks.enter_context(folder_lock(settings, name)):
            event("INFO", "%s is being processed by another importer; skipped", display(name))
            busy.append(name)
            continue
        if prepare is not None:
            prepare(name)
        files, left = list_files(settings.import_dir / name)
        folder = Folder(name, settings.import_dir / name, patient, files, left)
        for rel, why in left:
            warn("%s/%s: %s (left in place)", display(name), display(rel), why)
        # Its clock restarts after the preparation above: the originals it put back did
        # not change "after now".
        young += ((folder, f) for f in set_aside_unsettled(folder, settle.from_now(),
                                                           ask_young=wait_for_settle))
        if folder.files or folder.writing:
            group.append(folder)
            count += len(folder.files) + len(folder.writing)
        if count >= GROUP_FILES:
            yield _settled(settings, group, young, settle, taken)
            group, young, count = [], [], 0
    if group:
        yield _settled(settings, group, young, settle, taken)


def _settled(settings: Settings, group: list[Folder], young: list[tuple[Folder, SourceFile]],
             settle: SettleCheck, taken: list[Folder]) -> list[Folder]:
    wait_for_settling(young, settle)
    for folder in group:
        wait_whole(folder)
    unpack_archives(group, settings)  # archives among the settled files (unpack.py)
    for folder in group:
        progress.folder(folder.name, len(folder.files))
    taken += group
    return group


def set_aside_unsettled(folder: Folder, settle: SettleCheck, *,
                        ask_young: bool = False) -> list[SourceFile]:
    """Files something may still be writing wait for the folder's next quiet period.

    With ask_young (run-once), returns those of them kept back by their age alone, which
    wait_for_settling may still take in this run."""
    unsettled = settle.unsettled(((f.path, f.ident) for f in folder.files), ask_young=ask_young)
    if not unsettled:
        return []
    folder.writing.update({p: f"still being written: {u.why}" for p, u in unsettled.items()})
    young = [f for f in folder.files if (u := unsettled.get(f.path)) and u.by_age_alone]
    folder.files = [f for f in folder.files if f.path not in unsettled]
    return young


WAITS_WHOLE = "waits for the rest of its folder"


def wait_whole(folder: Folder) -> None:
    """A folder still being copied waits whole: its settled files are not read, stamped or
    sent while any of its files is still arriving. What arrives later may be another
    patient's CD, and the folder is checked as one (chaos seed 35: run-once during a slow
    copy sent the first file under the folder's ID before the second patient's arrived)."""
    if not folder.writing or not folder.files:
        return
    first = min(folder.writing)
    why = f"{WAITS_WHOLE} ({os.path.relpath(first, folder.path)}: {folder.writing[first]})"
    folder.writing.update((f.path, why) for f in folder.files)
    folder.files = []


def wait_for_settling(young: list[tuple[Folder, SourceFile]], settle: SettleCheck) -> None:
    """run-once right after a copy: files nobody is writing, kept back only by their age,
    are waited for once for the whole batch (until the youngest has settled, never longer
    than SETTLE_SECONDS), then taken if they are still exactly what was listed and still
    nobody writes them. The others stay for the next run, as before.

    Raises dcmtk.Stopped if the importer is told to stop during the wait."""
    if not young:
        return
    seconds = settle.settle_seconds
    # A hair more than the youngest needs (the wall clock against the timer's), but never
    # more than SETTLE_SECONDS (a network mount's clock ahead of ours).
    youngest = max(f.ident.changed_at() for _, f in young)
    left = min(seconds, youngest + seconds - settle.from_now().now + 0.05)
    if left > 0:
        files = f"{len(young)} files" if len(young) != 1 else "1 file"
        event("INFO", "%s changed less than %g s ago and nobody is writing them: "
              "waiting %.1f s for them to settle", files, seconds, left)
        if dcmtk.stop_requested(left):
            raise dcmtk.Stopped
    settle.from_now()
    for folder in {id(f): f for f, _ in young}.values():
        note_arrivals(folder)
    taken: dict[int, tuple[Folder, list[SourceFile]]] = {}
    for folder, source in young:
        now = identity(source.path)
        if now != source.ident:
            why = "vanished" if now is None else "changed"
            folder.writing[source.path] = f"still being written: {why} while waiting to settle"
        elif (found := settle.judge(source.path, now)) is not None:
            folder.writing[source.path] = f"still being written: {found.why}"
        else:
            del folder.writing[source.path]
            taken.setdefault(id(folder), (folder, []))[1].append(source)
    for folder, back in taken.values():
        folder.files = sorted([*folder.files, *back], key=_listing_order)


def note_arrivals(folder: Folder) -> None:
    """Files that appeared in the folder since it was listed (a copy still running while
    run-once waited for its first files to settle) are still being written: the folder
    then waits whole (chaos seed 94: the wait took the first file of a copy whose next
    files, another patient's, had arrived meanwhile)."""
    files, _ = list_files(folder.path)
    known = {f.path for f in folder.files} | set(folder.writing)
    for source in files:
        if source.path not in known:
            folder.writing[source.path] = "still being written: arrived while waiting to settle"


def _listing_order(source: SourceFile) -> tuple[tuple[str, ...], str]:
    """list_files' order (os.walk, sorted: a directory's files before its subdirectories)."""
    *dirs, name = source.rel.split(os.sep)
    return tuple(dirs), name


def unchanged(folder: Folder, files: list[SourceFile], when: str) -> list[SourceFile]:
    """The files still exactly as recorded; the others wait, untouched, for the next quiet
    period (a writer came back, or the file was replaced)."""
    kept = []
    for source in files:
        if why := changed_since(source.path, source.ident):
            folder.writing[source.path] = f"still being written: {why} {when}"
            folder.to_quarantine.pop(source.path, None)
        else:
            kept.append(source)
    return kept
