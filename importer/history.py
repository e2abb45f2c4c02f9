"""Hourly counters for the status page's chart: files archived per destination, files
quarantined and held, and the hours a destination was down, kept for 15 days.

A small SQLite file of its own in STATE_DIR (`history.sqlite3`), not the journal: bounded
(rows older than KEEP_HOURS go at each write, so ~15 days x 24 hours x a few kinds per
destination), surviving restarts, safe with two importers at once (SQLite's lock, not a
JSON file rewritten by both). Written once per folder finish, never per file: one short
transaction of a few upserts. Counting is best effort: a failure here is one warning and
never stops an import. The status page only reads it (read-only connection).

`/metrics` keeps its own per-process counters (metrics.py); this is the operator's picture.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.config import Settings
from importer.logs import warn

KEEP_HOURS = 15 * 24  # the chart shows 14 days; a day more for a day that is not whole
NAMES_PER_HOUR = 5  # folder names kept per hour and kind (the bars' titles)
SITE = ""  # the destination of counts that are the site's, not one PACS's
KINDS = ("archived", "quarantined", "held", "down")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hourly (
    hour        INTEGER NOT NULL,  -- unix time // 3600
    destination TEXT NOT NULL,     -- a destination's name, '' for the site
    kind        TEXT NOT NULL,     -- archived, quarantined, held, down (1 = down that hour)
    n           INTEGER NOT NULL,
    PRIMARY KEY (hour, destination, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly_names (
    hour   INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    folder TEXT NOT NULL,
    PRIMARY KEY (hour, kind, folder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outage (    -- a destination failing when last looked at
    destination TEXT PRIMARY KEY,
    since       REAL NOT NULL,
    marked_to   INTEGER NOT NULL       -- hours up to this one are marked down already
);
CREATE TABLE IF NOT EXISTS held_seen (  -- a held folder's files are counted once
    folder TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
"""

_ADD = ("INSERT INTO hourly (hour, destination, kind, n) VALUES (?, ?, ?, ?)"
        " ON CONFLICT DO UPDATE SET n = n + excluded.n")
_DOWN = ("INSERT INTO hourly (hour, destination, kind, n) VALUES (?, ?, 'down', 1)"
         " ON CONFLICT DO NOTHING")

_warned: set[str] = set()


def path_of(state_dir: Path) -> Path:
    return state_dir / "history.sqlite3"


def _connect(state_dir: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path_of(state_dir), timeout=10, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA journal_size_limit=262144")
    db.executescript(_SCHEMA)
    return db


# One connection per state dir for the life of the process: opening costs ~0.5 ms and the
# last close checkpoints the WAL with an fsync (~4 ms), both too dear once per folder.
_open: dict[Path, sqlite3.Connection] = {}
_lock = threading.Lock()


def _db(state_dir: Path) -> sqlite3.Connection:
    db = _open.get(state_dir)
    if db is None:
        db = _open[state_dir] = _connect(state_dir)
    return db


@dataclass
class Finished:
    """What one folder finish adds: per destination the files archived that it holds."""

    folder: str
    archived: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    held_files: int | None = None  # None: the folder is not held


def add(state_dir: Path, finished: Finished, destinations: dict[str, dict[str, Any]],
        now: float | None = None) -> None:
    """Count a folder's finish in its hour, mark outages, drop what is older than
    KEEP_HOURS: one transaction."""
    now = time.time() if now is None else now
    hour = int(now // 3600)
    with _lock:
        db = _db(state_dir)
        try:
            _add(db, finished, destinations, now, hour)
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def mark_down(state_dir: Path, destinations: dict[str, dict[str, Any]],
              now: float | None = None) -> None:
    """Mark the hours of outages while nothing finishes (watch parks the folders of a
    destination that is down: no folder finishes to mark them)."""
    now = time.time() if now is None else now
    with _lock:
        db = _db(state_dir)
        try:
            db.execute("BEGIN IMMEDIATE")
            _mark_outages(db, destinations, int(now // 3600))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _add(db: sqlite3.Connection, finished: Finished, destinations: dict[str, dict[str, Any]],
         now: float, hour: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    rows = [(hour, name, "archived", n) for name, n in finished.archived.items() if n]
    if finished.quarantined:
        rows.append((hour, SITE, "quarantined", finished.quarantined))
        _name(db, hour, "quarantined", finished.folder)
    if finished.held_files is None:
        db.execute("DELETE FROM held_seen WHERE folder = ?", (finished.folder,))
    else:
        seen = db.execute("SELECT 1 FROM held_seen WHERE folder = ?",
                          (finished.folder,)).fetchone()
        db.execute("INSERT INTO held_seen (folder, at) VALUES (?, ?) ON CONFLICT DO"
                   " UPDATE SET at = excluded.at", (finished.folder, now))
        if seen is None:
            rows.append((hour, SITE, "held", finished.held_files))
            _name(db, hour, "held", finished.folder)
    db.executemany(_ADD, rows)
    _mark_outages(db, destinations, hour)
    oldest = hour - KEEP_HOURS
    db.execute("DELETE FROM hourly WHERE hour < ?", (oldest,))
    db.execute("DELETE FROM hourly_names WHERE hour < ?", (oldest,))
    db.execute("DELETE FROM held_seen WHERE at < ?", (oldest * 3600.0,))  # gone folders
    db.execute("COMMIT")


def _name(db: sqlite3.Connection, hour: int, kind: str, folder: str) -> None:
    (count,) = db.execute("SELECT COUNT(*) FROM hourly_names WHERE hour = ? AND kind = ?",
                          (hour, kind)).fetchone()
    if count < NAMES_PER_HOUR:
        db.execute("INSERT INTO hourly_names VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                   (hour, kind, folder))


def _mark_outages(db: sqlite3.Connection, destinations: dict[str, dict[str, Any]],
                  hour: int) -> None:
    """Every hour from a destination's first failure to now (or to its last failure once it
    answers again) is marked down; each hour once, however many folders finish in it."""
    known = {name: (since, marked) for name, since, marked
             in db.execute("SELECT destination, since, marked_to FROM outage")}
    for name, entry in destinations.items():
        since = entry.get("failing_since")
        if isinstance(since, int | float):
            start, marked = known.get(name, (since, int(since // 3600) - 1))
            first = max(marked + 1, int(since // 3600), hour - KEEP_HOURS)
            db.executemany(_DOWN, ((h, name) for h in range(first, hour + 1)))
            db.execute("INSERT INTO outage VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET"
                       " marked_to = excluded.marked_to", (name, start, hour))
        elif name in known:  # answering again: the hours up to its last failure were down
            start, marked = known[name]
            last = entry.get("last_failure_at")
            end = int(last // 3600) if isinstance(last, int | float) else marked
            first = max(marked + 1, hour - KEEP_HOURS)
            db.executemany(_DOWN, ((h, name) for h in range(first, min(end, hour) + 1)))
            db.execute("DELETE FROM outage WHERE destination = ?", (name,))


@dataclass
class History:
    """Counts per (destination, kind) and hour; folder names per (kind, hour)."""

    counts: dict[tuple[str, str], dict[int, int]] = field(
        default_factory=lambda: defaultdict(dict))
    names: dict[tuple[str, int], list[str]] = field(default_factory=lambda: defaultdict(list))

    def get(self, destination: str, kind: str, hour: int) -> int:
        return self.counts.get((destination, kind), {}).get(hour, 0)


def load(state_dir: Path, since_hour: int) -> History:
    """What is counted from since_hour on (read only: a GET changes nothing)."""
    found = History()
    if not path_of(state_dir).exists():
        return found
    try:
        db = sqlite3.connect(f"file:{path_of(state_dir)}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return found
    try:
        for hour, destination, kind, n in db.execute(
                "SELECT hour, destination, kind, n FROM hourly WHERE hour >= ?", (since_hour,)):
            found.counts[(destination, kind)][hour] = n
        for hour, kind, folder in db.execute(
                "SELECT hour, kind, folder FROM hourly_names WHERE hour >= ?"
                " ORDER BY hour, folder", (since_hour,)):
            found.names[(kind, hour)].append(folder)
    except sqlite3.Error:
        pass  # a file from a newer version, or being created: no picture rather than an error
    finally:
        db.close()
    return found


def counted(finish: Callable[..., None]) -> Callable[..., None]:
    """Wraps finish.finish(folder, settings, journal, ...): after it, the folder's counts go
    into this hour (the one hook in the pipeline)."""

    @functools.wraps(finish)
    def wrapper(folder: Any, settings: Settings, journal: Any, *args: Any) -> None:
        optional = [d.name for d in settings.destinations if not d.required]
        before = ({name: journal.lookup([f.key for f in folder.ready], name)
                   for name in optional} if optional and folder.ready else {})
        finish(folder, settings, journal, *args)
        if settings.dry_run:
            return
        try:
            add(settings.state_dir, finished_of(folder, settings, before),
                journal.destinations())
        except (sqlite3.Error, OSError) as exc:
            if str(exc) not in _warned:
                _warned.add(str(exc))
                warn("Cannot count the status page's history in %s: %s (the import goes on)",
                     path_of(settings.state_dir), exc)

    return wrapper


def finished_of(folder: Any, settings: Settings,
                optional: dict[str, dict[Any, Any]]) -> Finished:
    """A folder after finish(): archived and sent (every required destination holds those),
    what optional destinations got of them, quarantined, held."""
    result = Finished(folder.name, quarantined=folder.quarantined)
    if folder.held:
        result.held_files = len(folder.files) + len(folder.unsent)
        return result
    for destination in settings.destinations:
        if destination.required:
            result.archived[destination.name] = folder.sent
        elif destination.name in optional:
            kept = set(folder.pending) | set(folder.to_quarantine) | set(folder.writing)
            result.archived[destination.name] = sum(
                1 for f in folder.ready
                if f.path not in kept and optional[destination.name][f.key].delivered)
    return result


def seed(state_dir: Path, counts: Iterable[tuple[int, str, str, int]],
         names: Iterable[tuple[int, str, str]] = ()) -> None:
    """Write counts (hour, destination, kind, n) and names (hour, kind, folder) as they are:
    for tests and demos (a history without waiting 14 days)."""
    os.makedirs(state_dir, exist_ok=True)
    db = _connect(state_dir)
    try:
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_ADD, counts)
            db.executemany("INSERT INTO hourly_names VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                           names)
    finally:
        db.close()
