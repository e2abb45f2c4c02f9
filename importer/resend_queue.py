"""The status page's resends, one at a time in a thread of their own.

A resend asks each PACS again, copies, stamps, sends and verifies: seconds to minutes, which
an HTTP request must not wait for, and two at once would only compete for the same PACS. A
job waits for its folder's lock while the watch loop's batch is at work on a folder of the
same name in the import dir (resend_missing takes it again, reentrantly, in this thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from importer import dcmtk
from importer.config import ConfigError, Settings
from importer.folders import display
from importer.logs import event
from importer.resend import resend_missing
from importer.snapshot import folder_lock

LOCK_POLL = 1.0  # seconds between tries for a folder another batch holds
STOP_WAIT = 30.0  # how long stop() waits for a resend under way to end

OUTCOMES = {
    0: "every instance is listed again at each PACS",
    1: "not everything is back (left for retry, held or quarantined, or a PACS could not be"
       " asked: see the log); the folder stays listed as missing",
    3: "another importer was processing the folder; nothing resent (try again)",
}


def outcome(code: int) -> str:
    """resend_missing's exit code, in words."""
    return f"exit code {code}: {OUTCOMES.get(code, 'unexpected')}"


@dataclass(frozen=True)
class Job:
    key: str  # the folder's entry in the "missing at a PACS" list (audit.missing_key)
    folder: Path  # ARCHIVE_DIR/<ts>/<folder>
    client: str
    queued_at: str


class ResendQueue:
    """One worker thread, started with the first job; ended(job, ok, words) is called in
    it when a job ends, whatever its end."""

    def __init__(self, settings: Settings, ended: Callable[[Job, bool, str], None]) -> None:
        self.settings = settings
        self.ended = ended
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.under_way: dict[str, Job] = {}  # queued or running, by key
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def submit(self, job: Job) -> Job | None:
        """Queue job; returns the job already queued or running for its folder instead (and
        queues nothing), if there is one."""
        with self.lock:
            if job.key in self.under_way:
                return self.under_way[job.key]
            if self.stopping.is_set():
                return job  # shutting down: nothing new starts
            self.under_way[job.key] = job
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="status-resend",
                                               daemon=True)
                self.thread.start()
        self.jobs.put(job)
        return None

    def job(self, key: str) -> Job | None:
        with self.lock:
            return self.under_way.get(key)

    def busy(self) -> set[str]:
        with self.lock:
            return set(self.under_way)

    def stop(self) -> None:
        """No new job; queued ones end as not started; a running one is given STOP_WAIT
        (on a signal its DCMTK calls are stopped anyway: dcmtk.request_stop)."""
        with self.lock:
            self.stopping.set()
            thread = self.thread
        self.jobs.put(None)
        if thread is not None:
            thread.join(STOP_WAIT)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                ok, words = self._resend(job)
            except Exception as exc:  # noqa: BLE001 (a dying thread says nothing: say it)
                ok, words = False, f"failed: {type(exc).__name__}: {exc}"
            with self.lock:
                self.under_way.pop(job.key, None)
            self.ended(job, ok, words)

    def _resend(self, job: Job) -> tuple[bool, str]:
        waited = False
        while not self.stopping.is_set():
            with folder_lock(self.settings, job.folder.name) as mine:
                if mine:
                    return self._run(job)
            if not waited:
                event("INFO", "Status page: resend of %s waits for the batch at work on that"
                      " folder", display(job.folder.name))
                waited = True
            self.stopping.wait(LOCK_POLL)
        return False, "not started: the importer stopped first"

    def _run(self, job: Job) -> tuple[bool, str]:
        try:
            code = resend_missing(self.settings, str(job.folder))
        except ConfigError as exc:
            return False, f"not done: {exc}"
        except dcmtk.Stopped:
            return False, ("stopped: the importer is shutting down (what was copied back goes"
                           " with the next run)")
        except (OSError, dcmtk.DcmtkMissing) as exc:
            return False, f"failed: {exc}"
        return code == 0, outcome(code)
