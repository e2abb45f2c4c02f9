"""Which file reached which destination: SQLite in STATE_DIR.

A file is known by its path, size, modification time and change time (ctime, which no
user-space write can set back), so a file rewritten or replaced under the same name starts
over; the journal counts how many earlier versions of it a PACS had acknowledged
("superseded"). After a crash the next run sends each file only to the
destinations that have not acknowledged it, and counts refusals toward quarantine.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importer.journal_db import UPSERT, connect
from importer.share import Identity


@dataclass(frozen=True, slots=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str, ident: Identity) -> FileKey:
        """The key of the version of path that ident describes."""
        return cls(path, ident.size, ident.mtime_ns, ident.ctime_ns)


@dataclass(slots=True)
class Delivery:
    delivered: bool = False
    attempts: int = 0
    refusals: int = 0
    last_error: str | None = None
    delivered_at: float | None = None
    last_status: str | None = None
    verified: bool = False
    not_found: int = 0
    superseded: int = 0  # earlier versions of this file the PACS had acknowledged
    verified_by: str | None = None  # 'c-find', or 'c-store' (no C-FIND could tell)
    verify_error: str | None = None  # why the last C-FIND gave no verdict


@dataclass(frozen=True, slots=True)
class SentStudy:
    patient_id: str
    folder: str
    sent_at: float


def common_dir(paths: list[str]) -> str:
    """A directory all paths are under, each of them followed there by a separator (a
    lookup's range scan starts at it). os.path.commonpath splits every path: ~5 % of the
    Python of a 50,000-file drain; the common prefix of the smallest and largest is one
    comparison."""
    prefix = os.path.commonprefix(paths)
    cut = prefix.rfind(os.sep)
    return prefix[:cut] if cut >= 0 else ""


def _shared(texts: dict[str, str], text: str | None) -> str | None:
    return None if text is None else texts.setdefault(text, text)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.db = connect(state_dir)
        self.lock = threading.Lock()  # one connection, shared by the sender threads

    def close(self) -> None:
        self.db.close()

    def lookup(self, keys: Iterable[FileKey], destination: str) -> dict[FileKey, Delivery]:
        """What the journal knows of these files at one destination (stale rows ignored)."""
        keys = list(keys)
        if not keys:
            return {}
        # One range scan over the primary key: the rows under the keys' common directory
        # (one key: the rows from its own path on, as few as there are).
        low = os.fsencode(keys[0].path if len(keys) == 1 else common_dir([k.path for k in keys]))
        wanted = {key.path: key for key in keys}
        known: dict[FileKey, Delivery] = {}
        texts: dict[str, str] = {}  # one object per distinct status or reason (20,000 files
        # of a folder mostly share them)
        with self.lock:
            rows = self.db.execute(
                "SELECT path, size, mtime_ns, delivered_at, attempts, refusals, last_error,"
                " last_status, verified_at, not_found, ctime_ns, superseded, verified_by,"
                " verify_error FROM delivery"
                " WHERE path >= ? AND path < ? AND destination = ?",
                (low, low + b"\xff", destination))
            for (path, size, mtime_ns, delivered_at, attempts, refusals, last_error,
                 last_status, verified_at, not_found, ctime_ns, superseded, verified_by,
                 verify_error) in rows:
                key = wanted.get(os.fsdecode(path))
                if key is None:
                    continue
                if size == key.size and mtime_ns == key.mtime_ns and ctime_ns in (
                        None, key.ctime_ns):
                    known[key] = Delivery(
                        delivered_at is not None, attempts, refusals,
                        _shared(texts, last_error), delivered_at, _shared(texts, last_status),
                        verified_at is not None, not_found, superseded,
                        (verified_by or "c-find") if verified_at is not None else None,
                        _shared(texts, verify_error))
                else:  # an earlier version of the file
                    known[key] = Delivery(superseded=superseded + (delivered_at is not None))
        for key in keys:
            if key not in known:
                known[key] = Delivery()
        return known

    def record(
        self,
        destination: str,
        outcomes: Iterable[tuple[FileKey, bool, int, str]],
        studies: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        """Store (key, delivered, refusals, status) per file after a send, in one transaction:
        refusals is 1 for a refusal, more for one no retry can change. studies: (study UID,
        PatientID, folder) of the files acknowledged; the first PatientID a study went
        under is the one remembered."""
        now = time.time()
        outcomes = list(outcomes)
        delivered_any = any(delivered for _k, delivered, _r, _s in outcomes)
        failures = [status for _k, delivered, _r, status in outcomes if not delivered]
        last_success = now if delivered_any else None
        last_failure = failures[-1] if failures else None
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(UPSERT, (
                (os.fsencode(key.path), destination, key.size, key.mtime_ns, key.ctime_ns,
                 now if delivered else None, int(refused), status,
                 None if delivered else status, now)
                for key, delivered, refused, status in outcomes))
            self.db.executemany(
                "INSERT INTO study (study_uid, patient_id, folder, sent_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                ((uid, patient_id, os.fsencode(folder), now)
                 for uid, patient_id, folder in studies))
            self.db.execute("INSERT INTO destination (name) VALUES (?) ON CONFLICT DO NOTHING",
                            (destination,))
            if last_success is not None:
                self.db.execute("UPDATE destination SET last_success_at = ?,"
                                " failing_since = NULL WHERE name = ?",
                                (last_success, destination))
            if last_failure is not None:
                self.db.execute("UPDATE destination SET last_failure_at = ?, last_error = ?,"
                                " failing_since = CASE WHEN ? THEN failing_since"
                                " ELSE COALESCE(failing_since, ?) END WHERE name = ?",
                                (now, last_failure, last_success is not None, now, destination))

    def mark_verified(self, destination: str, keys: Iterable[FileKey],
                      by: str = "c-find", why: str | None = None) -> None:
        """The verdict on these files at destination is reached: listed by C-FIND, or (by
        'c-store', why) its C-STORE answer is all there is. Never asked again."""
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE delivery SET verified_at = ?, verified_by = ?, verify_error = ?"
                " WHERE path = ? AND destination = ?",
                ((time.time(), by, why, os.fsencode(k.path), destination) for k in keys))

    def mark_unverified(self, destination: str, keys: Iterable[FileKey], why: str,
                        give_up_after: int = 0) -> None:
        """A C-FIND about these files gave no verdict: they wait, saying why. With
        give_up_after, this counts as a failure of a PACS that is up, and after that many
        the C-STORE answer becomes the verdict (verify = auto)."""
        now = time.time()
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE delivery SET verify_error = ?,"
                " verify_failures = verify_failures + (? > 0),"
                " verified_at = CASE WHEN ? > 0 AND verify_failures + 1 >= ? THEN ? END,"
                " verified_by = CASE WHEN ? > 0 AND verify_failures + 1 >= ? THEN 'c-store' END"
                " WHERE path = ? AND destination = ? AND delivered_at IS NOT NULL",
                ((why, give_up_after, give_up_after, give_up_after, now, give_up_after,
                  give_up_after, os.fsencode(k.path), destination) for k in keys))

    def mark_not_found(self, destination: str, keys: Iterable[FileKey], reason: str) -> None:
        """Acknowledged but not listed: no longer counts as delivered (it is sent again)."""
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "UPDATE delivery SET delivered_at = NULL, verified_at = NULL,"
                " not_found = not_found + 1, last_error = ? WHERE path = ? AND destination = ?",
                ((reason, os.fsencode(k.path), destination) for k in keys))

    def forget(self, paths: Iterable[str]) -> None:
        """Drop rows of files that left the import dir (archived or quarantined)."""
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM delivery WHERE path = ?",
                                ((os.fsencode(p),) for p in paths))

    def undelivered_counts(self) -> dict[str, int]:
        """Per destination: files in the import dir it has not acknowledged yet."""
        with self.lock:
            rows = self.db.execute("SELECT destination, COUNT(*) FROM delivery"
                                   " WHERE delivered_at IS NULL GROUP BY destination")
            return dict(rows.fetchall())

    def paces(self) -> dict[str, float]:
        """Per destination: the time between its answers when last measured."""
        with self.lock:
            rows = self.db.execute("SELECT name, seconds_per_file FROM destination"
                                   " WHERE seconds_per_file IS NOT NULL")
            return dict(rows.fetchall())

    def remember_paces(self, paces: dict[str, float]) -> None:
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for name, seconds in paces.items():
                self.db.execute("INSERT INTO destination (name, seconds_per_file) VALUES (?, ?)"
                                " ON CONFLICT (name) DO UPDATE SET"
                                " seconds_per_file = excluded.seconds_per_file",
                                (name, seconds))

    def studies_sent(self, study_uids: Iterable[str]) -> dict[str, SentStudy]:
        """Which of these studies this importer has sent, and under which PatientID."""
        uids = list(dict.fromkeys(study_uids))
        found: dict[str, SentStudy] = {}
        with self.lock:
            for start in range(0, len(uids), 500):
                part = uids[start:start + 500]
                rows = self.db.execute(
                    "SELECT study_uid, patient_id, folder, sent_at FROM study WHERE study_uid"
                    f" IN ({','.join('?' * len(part))})", part)
                found.update((uid, SentStudy(pid, os.fsdecode(folder), at))
                             for uid, pid, folder, at in rows)
        return found

    def record_release(self, folder: str, accepted: str, reason: str, by: str,
                       versions: Iterable[tuple[str, int, int]]) -> None:
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT OR REPLACE INTO release (folder, released_at, released_by, reason,"
                " accepted, versions) VALUES (?, ?, ?, ?, ?, ?)",
                (os.fsencode(folder), time.time(), by, reason, accepted,
                 json.dumps(sorted(versions))))

    def release_of(self, folder: str) -> dict[str, Any] | None:
        """The release recorded for this folder: when, by whom, why, what it accepted, and
        the file versions (rel, size, mtime_ns) it covers."""
        with self.lock:
            row = self.db.execute("SELECT released_at, released_by, reason, accepted, versions"
                                  " FROM release WHERE folder = ?",
                                  (os.fsencode(folder),)).fetchone()
        if row is None:
            return None
        at, by, reason, accepted, versions = row
        return {"released_at": at, "released_by": by, "reason": reason, "accepted": accepted,
                "versions": {tuple(v) for v in json.loads(versions)}}

    def extend_release(self, folder: str, versions: Iterable[tuple[str, int, int]]) -> None:
        """The versions the importer itself made of released files (stamped) stay covered."""
        with self.lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT versions FROM release WHERE folder = ?",
                                  (os.fsencode(folder),)).fetchone()
            if row is not None:
                known = {tuple(v) for v in json.loads(row[0])} | set(versions)
                self.db.execute("UPDATE release SET versions = ? WHERE folder = ?",
                                (json.dumps(sorted(known)),
                                 os.fsencode(folder)))

    def drop_release(self, folder: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM release WHERE folder = ?", (os.fsencode(folder),))

    def released(self) -> set[str]:
        """The folders a release is recorded for."""
        with self.lock:
            return {os.fsdecode(row[0])
                    for row in self.db.execute("SELECT folder FROM release")}

    def destinations(self) -> dict[str, dict[str, float | str | None]]:
        """Per destination: when it last took a file, when it last failed, and why."""
        with self.lock:
            rows = self.db.execute("SELECT name, last_success_at, last_failure_at, last_error,"
                                   " failing_since FROM destination")
            return {name: {"last_success_at": ok, "last_failure_at": bad, "last_error": error,
                           "failing_since": since}
                    for name, ok, bad, error, since in rows}
