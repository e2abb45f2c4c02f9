"""[PHASE 2]: send verified files to every destination, and ask each PACS back.

Destinations are served in parallel, each over a few associations (storescu processes),
while the pipeline stamps the next folder. A file counts as delivered only by the PACS's
own answer for it, written to the journal as it arrives; where a destination answers
C-FIND, a folder's files are looked up there as soon as its sends are done.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from importer import dcmtk
from importer.config import Destination, Settings
from importer.folders import display
from importer.journal import FileKey, Journal
from importer.logs import error, event, warn
from importer.model import Folder, SourceFile
from importer.verify import Verifier

# Against a PACS that answers fast, one more storescu costs more than it gains below ~100
# files; against one that stalls per file (Nagle: ~44 ms), parallel associations are the
# lever, down to small groups. Which one it is shows in the answers of the first folder.
MIN_FILES_PER_ASSOCIATION = 100
MIN_FILES_PER_ASSOCIATION_SLOW = 10
SLOW_SECONDS_PER_FILE = 0.01


class Sender:
    """Sends folders' verified files to every destination in parallel, a few associations
    each, while the caller stamps the next folder."""

    def __init__(self, settings: Settings, journal: Journal) -> None:
        self.settings = settings
        self.journal = journal
        self.verifier = Verifier(settings, journal)
        workers = sum(d.associations for d in settings.destinations)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storescu")
        self.verify_pool = ThreadPoolExecutor(max_workers=len(settings.destinations),
                                              thread_name_prefix="findscu")
        self.futures: list[Future[None]] = []
        self.pace: dict[str, float] = {}  # destination -> seconds between its answers
        self.pace_lock = threading.Lock()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self.futures:
            if failure := future.exception():  # the files stay and are retried
                error("sending stopped: %s", failure, exc_info=failure)
        self.pool.shutdown(wait=True)
        self.verify_pool.shutdown(wait=True)

    def submit(self, folder: Folder) -> None:
        if not folder.ready:
            return
        for destination in self.settings.destinations:
            known = self.journal.lookup([f.key for f in folder.ready], destination.name)
            todo = [f for f in folder.ready if not known[f.key].delivered]
            retries = [f for f in todo if known[f.key].attempts]
            if retries and self.verifier.applies(destination):
                there = self.verifier.already_there(destination, folder.patient.id, retries)
                todo = [f for f in todo if f.path not in there]
            sends = []
            if todo:
                slow = self.pace.get(destination.name, 0.0) > SLOW_SECONDS_PER_FILE
                groups = _split(todo, destination, slow)
                event("PHASE 2", "%s: sending %d files to %s over %d association%s",
                      display(folder.name), len(todo), destination.label, len(groups),
                      "" if len(groups) == 1 else "s")
                sends = [self.pool.submit(self._send, destination, transfer_syntax, group)
                         for transfer_syntax, group in groups]
                self.futures += sends
            if self.verifier.applies(destination):
                self.futures.append(
                    self.verify_pool.submit(self._verify, destination, folder, sends))

    def _verify(self, destination: Destination, folder: Folder,
                sends: list[Future[None]]) -> None:
        """Once this folder's sends to destination are done, ask the PACS what it holds."""
        for send in sends:
            send.exception()  # wait; failures are recorded per file
        if not self.verifier.applies(destination):
            return
        known = self.journal.lookup([f.key for f in folder.ready], destination.name)
        check = [f for f in folder.ready if known[f.key].delivered and not known[f.key].verified]
        if check:
            wrong = self.verifier.verify(destination, folder.patient.id, check)
            folder.to_quarantine.update(wrong)

    def _send(self, destination: Destination, transfer_syntax: str,
              files: list[SourceFile]) -> None:
        by_path = {f.path: f for f in files}
        recorder = _AnswerRecorder(self.journal, destination.name, by_path,
                                   lambda seconds: self._note_pace(destination.name, seconds))
        try:
            results, error = dcmtk.store(destination, list(by_path), transfer_syntax,
                                         on_answer=recorder.add)
        except (dcmtk.DcmtkMissing, dcmtk.Stopped) as exc:
            results, error = {}, str(exc)
        recorder.flush()
        if error:
            warn("%s: %s", destination.label, error)
        for source in files:
            if source.path not in recorder.recorded:
                recorder.add(source.path, results.get(source.path)
                             or dcmtk.StoreResult(dcmtk.Outcome.TRANSIENT, error))
        recorder.flush()

    def _note_pace(self, destination: str, seconds: float) -> None:
        with self.pace_lock:
            old = self.pace.get(destination)
            self.pace[destination] = seconds if old is None else 0.7 * old + 0.3 * seconds


class _AnswerRecorder:
    """Writes the PACS's answers to the journal while storescu is still running (at most
    every 0.1 s: a few commits a second), so a crash mid-send resends only about the last
    0.1 s of answers (and whatever an orphaned storescu sends after its parent died)."""

    def __init__(self, journal: Journal, destination: str, files: dict[str, SourceFile],
                 on_pace: Callable[[float], None]) -> None:
        self.journal = journal
        self.destination = destination
        self.files = files
        self.on_pace = on_pace  # told the time between two answers of this association
        self.recorded: set[str] = set()
        self.buffer: list[tuple[FileKey, bool, bool, str]] = []
        self.last_flush = time.monotonic()
        self.last_answer: float | None = None

    def add(self, path: str, result: dcmtk.StoreResult) -> None:
        source = self.files.get(path)
        if source is None or path in self.recorded:
            return
        self.recorded.add(path)
        now = time.monotonic()
        if self.last_answer is not None:
            self.on_pace(now - self.last_answer)
        self.last_answer = now
        self.buffer.append((source.key, result.outcome is dcmtk.Outcome.DELIVERED,
                            result.outcome is dcmtk.Outcome.PERMANENT, result.detail))
        if now - self.last_flush > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.journal.record(self.destination, self.buffer)
            self.buffer = []
        self.last_flush = time.monotonic()


def _split(files: list[SourceFile], destination: Destination,
           slow: bool) -> list[tuple[str, list[SourceFile]]]:
    """Associations to open: per transfer syntax (storescu proposes compressed syntaxes only
    when told), each split over up to `associations` parallel associations."""
    smallest = MIN_FILES_PER_ASSOCIATION_SLOW if slow else MIN_FILES_PER_ASSOCIATION
    by_syntax: dict[str, list[SourceFile]] = {}
    for source in files:
        by_syntax.setdefault(dcmtk.proposal_for(source.transfer_syntax), []).append(source)
    groups = []
    for syntax, same in by_syntax.items():
        count = max(1, min(destination.associations,
                           math.ceil(len(same) / smallest)))
        size = math.ceil(len(same) / count)
        groups += [(syntax, same[i:i + size]) for i in range(0, len(same), size)]
    return groups

