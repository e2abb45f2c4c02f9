"""A person decides a held folder: `importer release FOLDER [--reason TEXT]`.

A folder held for its identity (the site knows its patient ID as someone else) or as two
patients goes on at its next run as it is now. The release is recorded in the journal
(when, by whom, why, what was accepted) and in the folder's receipt, and covers exactly the
file versions present when it was given (and those the importer then stamps): a file added
or changed afterwards lapses it, and the folder is checked afresh. A folder renamed to the
right ID is another folder: checked afresh.
"""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path

from importer.config import Settings
from importer.folders import display
from importer.journal import Journal
from importer.logs import event, warn
from importer.model import Folder, folder_hash
from importer.snapshot import list_files


class ReleaseError(Exception):
    """Nothing to release (the message says why)."""


def held_note(settings: Settings, folder_name: str) -> Path:
    """Where a held folder's reason is kept for `importer status`."""
    return settings.state_dir / "held" / f"{folder_hash(folder_name)}.txt"


def remember_held(settings: Settings, folder: Folder) -> None:
    """Held folders are listed by `importer status` until a person sorts them out: a note
    per folder, its name, then why it is held (then a line per release given)."""
    note = held_note(settings, folder.name)
    if folder.held:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(f"{folder.name}\n{folder.held}\n", encoding="utf-8",
                        errors="surrogateescape")
    else:
        note.unlink(missing_ok=True)


def read_note(note: Path) -> tuple[str, str, str | None] | None:
    """A held note: the folder's name, why it is held, and the last release given (None:
    no such note)."""
    try:
        text = note.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None
    name, reason, *more = text.split("\n") + [""]
    released = [line for line in more if line.startswith("released by ")]
    return name, reason.strip(), released[-1] if released else None


def held_reason(settings: Settings, folder_name: str) -> str | None:
    note = read_note(held_note(settings, folder_name))
    return note[1] if note is not None and note[0] == folder_name else None


def versions_of(folder_path: Path) -> set[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file the pipeline would take."""
    files, _left = list_files(folder_path)
    return {(f.rel, f.size, f.mtime_ns) for f in files}


def release(settings: Settings, folder: str, reason: str,
            by: str | None = None) -> tuple[str, str]:
    """Record the release of a held folder (a name in the import dir, or its path) by a
    person (default: the user running this); returns its name and the hold it accepted."""
    path = Path(folder)
    as_path = path.is_absolute() or os.sep in folder.rstrip(os.sep)
    name = path.name if as_path else folder
    if as_path and path.resolve().parent != settings.import_dir.resolve():
        raise ReleaseError(f"{folder} is not a folder directly in {settings.import_dir}")
    if not (settings.import_dir / name).is_dir():
        raise ReleaseError(f"no folder {display(name)} in {settings.import_dir}")
    accepted = held_reason(settings, name)
    if accepted is None:
        raise ReleaseError(f"{display(name)} is not held: nothing to release (importer status"
                           " lists held folders)")
    by = by or os.environ.get("SUDO_USER") or _user()
    journal = Journal(settings.state_dir)
    try:
        journal.record_release(name, accepted, reason, by,
                               versions_of(settings.import_dir / name))
    finally:
        journal.close()
    with open(held_note(settings, name), "a", encoding="utf-8") as note:
        note.write(f"released by {by}\n")  # a watching importer sees this at once
    event("INFO", "%s released by %s%s; accepted: %s", display(name), by,
          f" ({reason})" if reason else "", accepted)
    return name, accepted


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def apply_release(folder: Folder, journal: Journal) -> None:
    """A held folder with a release that still covers its files goes on; a release whose
    files changed since lapses (the hold stays, checked afresh)."""
    if not folder.held:
        return
    given = journal.release_of(folder.name)
    if given is None:
        return
    changed = versions_of(folder.path) - given["versions"]
    if changed:
        journal.drop_release(folder.name)
        warn("%s: the release of %s lapsed: %d files were added or changed since; checked"
             " afresh", display(folder.name), _when(given["released_at"]), len(changed))
        return
    folder.released = {"released_at": _when(given["released_at"]), "by": given["released_by"],
                       "reason": given["reason"], "accepted": given["accepted"],
                       "now": folder.held}
    event("INFO", "%s: held (%s), but released by %s at %s%s: going on",
          display(folder.name), folder.held, given["released_by"],
          _when(given["released_at"]), f" ({given['reason']})" if given["reason"] else "")
    folder.held = None


def keep_covered(folder: Folder, journal: Journal) -> None:
    """After stamping a released folder, its stamped files stay covered by the release."""
    if folder.released is not None:
        journal.extend_release(folder.name, [(f.rel, f.size, f.mtime_ns) for f in folder.ready])


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
