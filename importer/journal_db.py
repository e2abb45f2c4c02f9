"""The journal's SQLite file: its tables, the columns added since the first release, the
statement that records an answer, and the connection every importer process opens."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery (
    path         BLOB    NOT NULL,  -- file-system bytes: names need not be UTF-8
    destination  TEXT    NOT NULL,
    size         INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    delivered_at REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    refusals     INTEGER NOT NULL DEFAULT 0,
    last_status  TEXT,
    last_error   TEXT,
    updated_at   REAL    NOT NULL,
    verified_at  REAL,              -- the PACS listed it (C-FIND) under the folder's ID
    not_found    INTEGER NOT NULL DEFAULT 0,  -- acknowledged, then not listed by C-FIND
    ctime_ns     INTEGER,           -- NULL in rows of versions before it was recorded
    superseded   INTEGER NOT NULL DEFAULT 0,  -- earlier versions this PACS acknowledged
    verified_by  TEXT,              -- 'c-find', or 'c-store' where no C-FIND could tell
    verify_error TEXT,              -- why the last C-FIND about it gave no verdict
    verify_failures INTEGER NOT NULL DEFAULT 0,  -- C-FIND failures while the PACS was up
    PRIMARY KEY (path, destination)
);
CREATE TABLE IF NOT EXISTS destination (
    name             TEXT PRIMARY KEY,
    last_success_at  REAL,
    last_failure_at  REAL,
    last_error       TEXT,
    failing_since    REAL,           -- first failure since its last success
    seconds_per_file REAL            -- time between its answers, as last measured
);
CREATE TABLE IF NOT EXISTS study (
    study_uid  TEXT PRIMARY KEY,     -- a study this importer has sent (a file acknowledged)
    patient_id TEXT NOT NULL,        -- the PatientID its first acknowledged file went under
    folder     BLOB NOT NULL,        -- the folder it came from
    sent_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS release (
    folder      BLOB PRIMARY KEY,    -- a held folder a person let go on (importer release)
    released_at REAL NOT NULL,
    released_by TEXT,
    reason      TEXT,
    accepted    TEXT NOT NULL,       -- the hold it accepted, as it was shown
    versions    TEXT NOT NULL        -- JSON [[rel, size, mtime_ns], ...]: the files it covers
);
"""


# Columns added since the first release: (table, column, its definition).
_MIGRATIONS = (
    ("delivery", "ctime_ns", "INTEGER"),
    ("delivery", "superseded", "INTEGER NOT NULL DEFAULT 0"),
    ("delivery", "verified_by", "TEXT"),
    ("delivery", "verify_error", "TEXT"),
    ("delivery", "verify_failures", "INTEGER NOT NULL DEFAULT 0"),
    ("destination", "failing_since", "REAL"),
    ("destination", "seconds_per_file", "REAL"),
)

# The row is of the same version of the file (a row from before ctime was recorded: by
# size and mtime alone).
_SAME = ("(size = excluded.size AND mtime_ns = excluded.mtime_ns"
         " AND (ctime_ns IS NULL OR ctime_ns = excluded.ctime_ns))")

# One file's answer from one destination; a file replaced under the same name starts over.
UPSERT = (
    "INSERT INTO delivery (path, destination, size, mtime_ns, ctime_ns, delivered_at,"
    " attempts, refusals, last_status, last_error, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)"
    " ON CONFLICT (path, destination) DO UPDATE SET"
    f"  delivered_at = CASE WHEN {_SAME} AND delivered_at IS NOT NULL"
    "    THEN delivered_at ELSE excluded.delivered_at END,"
    f"  attempts = CASE WHEN {_SAME} THEN attempts + 1 ELSE 1 END,"
    f"  refusals = CASE WHEN {_SAME} THEN refusals + excluded.refusals"
    "    ELSE excluded.refusals END,"
    f"  verified_at = CASE WHEN {_SAME} THEN verified_at END,"
    f"  verified_by = CASE WHEN {_SAME} THEN verified_by END,"
    f"  verify_error = CASE WHEN {_SAME} THEN verify_error END,"
    f"  verify_failures = CASE WHEN {_SAME} THEN verify_failures ELSE 0 END,"
    f"  not_found = CASE WHEN {_SAME} THEN not_found ELSE 0 END,"
    f"  superseded = CASE WHEN {_SAME} OR delivered_at IS NULL THEN superseded"
    "    ELSE superseded + 1 END,"
    "  size = excluded.size, mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns,"
    "  last_status = excluded.last_status, last_error = excluded.last_error,"
    "  updated_at = excluded.updated_at"
)


def _use_wal(db: sqlite3.Connection, wait: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL (a no-op once the file is in WAL mode) can answer "database
    is locked" at once, without the busy timeout, while another importer's connection
    holds the file: asked again until it can, as other statements wait for their lock."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect(state_dir: Path) -> sqlite3.Connection:
    """The journal in STATE_DIR, created or brought up to this release's columns; one
    connection, shared by a process's threads under the Journal's lock."""
    db = sqlite3.connect(state_dir / "journal.sqlite3", timeout=30,
                         check_same_thread=False, isolation_level=None)
    _use_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")
    # After a checkpoint the WAL file is cut back to 1 MB; otherwise, while any
    # connection keeps it open, it stays at the largest size it ever reached.
    db.execute("PRAGMA journal_size_limit=1048576")
    db.executescript(_SCHEMA)
    for table, column, definition in _MIGRATIONS:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    return db
