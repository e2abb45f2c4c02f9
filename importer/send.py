"""[PHASE 2]: send verified files to every destination, and ask each PACS back.

Destinations are served in parallel, each over a few associations (storescu processes),
while the pipeline stamps the next folder. A file counts as delivered only by the PACS's
own answer for it, written to the journal as it arrives; where a destination answers
C-FIND, a folder's files are looked up there as soon as its sends are done.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from importer import dcmtk, metrics, progress
from importer.config import Destination, Settings
from importer.folders import display
from importer.journal import FileKey, Journal
from importer.logs import error, event, warn
from importer.model import Folder, SourceFile
from importer.scratch import remove_stale, scratch_dir
from importer.share import Identity
from importer.stamp import WORK_DIR_NAME
from importer.verify import Verifier

# Against a PACS that answers fast, one more storescu (~40 ms of CPU to start: its data
# dictionary, the association) costs more than it gains below ~1,000 files (the importer's
# other work has the other core); against one that stalls per file (Nagle: ~44 ms), parallel
# associations are the lever, down to small groups. Which one it is shows in its answers,
# and is remembered in the journal for the next batch.
MIN_FILES_PER_ASSOCIATION = 1000
MIN_FILES_PER_ASSOCIATION_SLOW = 10
MIN_FILES_PER_ASSOCIATION_UNKNOWN = 100  # not measured yet: hedge between the two
SLOW_SECONDS_PER_FILE = 0.01
PACE_FIRST, PACE_EVERY = 10, 50  # an association's pace is told after 10 answers, then every 50
DECOMPRESSED = "decompress-"  # scratch directories of the copies sent decompressed


class Sender:
    """Sends folders' verified files to every destination in parallel, a few associations
    each, while the caller stamps the next folder."""

    def __init__(self, settings: Settings, journal: Journal,
                 skip: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.journal = journal
        # Destinations known to be down (watch): not tried; their files wait, quietly.
        self.skip = skip or {}
        # What this batch learnt: destinations that answered, and those that took no
        # association at all (the association-level error).
        self.reached: set[str] = set()
        self.unreachable: dict[str, str] = {}
        self.verifier = Verifier(settings, journal)
        remove_stale(settings.import_dir / WORK_DIR_NAME, DECOMPRESSED)  # of a killed run
        workers = sum(d.associations for d in settings.destinations)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storescu")
        self.verify_pool = ThreadPoolExecutor(max_workers=len(settings.destinations),
                                              thread_name_prefix="findscu")
        self.futures: list[Future[None]] = []
        # destination -> seconds between its answers: as measured by an earlier batch, then
        # by this one's answers
        self.pace: dict[str, float] = journal.paces()
        self.pace_lock = threading.Lock()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self.futures:
            if failure := future.exception():  # the files stay and are retried
                error("sending stopped: %s", failure, exc_info=failure)
        self.pool.shutdown(wait=True)
        self.verify_pool.shutdown(wait=True)
        self.journal.remember_paces(self.pace)

    def submit(self, folders: list[Folder], verify: bool = True) -> list[Future[None]]:
        """Send the verified files of these folders: the files of many folders share
        associations (a storescu start costs more than a small folder's files); each
        folder is looked up by C-FIND once its files' sends are done (verify=False: the
        caller asks for that with verify_when_sent). Returns the work begun (done: the
        folders can be finished)."""
        folders = [f for f in folders if f.ready]
        begun: list[Future[None]] = []
        if not folders:
            return begun
        first = self.settings.destinations[0]  # its answers are what progress counts
        for destination in self.settings.destinations:
            if destination.name in self.skip:
                continue
            todo: list[SourceFile] = []
            owners: dict[str, Folder] = {}
            for folder in folders:
                todo_here = self._todo(destination, folder)
                todo += todo_here
                owners.update((f.path, folder) for f in todo_here)
            counted = destination is first and progress.active()
            sends = []
            if todo:
                groups = _split(todo, destination, _smallest_group(self.pace.get(destination.name)))
                what = (display(folders[0].name) if len(folders) == 1
                        else f"{len(folders)} folders")
                event("PHASE 2", "%s: sending %d files to %s over %d association%s",
                      what, len(todo), destination.label, len(groups),
                      "" if len(groups) == 1 else "s")
                sends = [self.pool.submit(self._send, destination, transfer_syntax, group,
                                          owners, counted)
                         for transfer_syntax, group in groups]
                begun += sends
            if destination.verify != "none" and verify:
                begun += [self.verify_pool.submit(self._verify, destination, folder, sends)
                          for folder in folders]
        self.futures += begun
        return begun

    def verify_when_sent(self, folders: list[Folder],
                         sends: list[Future[None]]) -> list[Future[None]]:
        """Look these folders up by C-FIND once all these sends are done (a big folder
        sent in parts: one query per study, not one per part)."""
        begun = [self.verify_pool.submit(self._verify, destination, folder, sends)
                 for destination in self.settings.destinations
                 if destination.verify != "none" and destination.name not in self.skip
                 for folder in folders if folder.ready]
        self.futures += begun
        return begun

    def _todo(self, destination: Destination, folder: Folder) -> list[SourceFile]:
        """The folder's files this destination has not acknowledged (nor holds already)."""
        known = self.journal.lookup([f.key for f in folder.ready], destination.name)
        todo = [f for f in folder.ready if not known[f.key].delivered]
        retries = [f for f in todo if known[f.key].attempts]
        if retries and self.verifier.applies(destination):
            there = self.verifier.already_there(destination, folder.patient.id, retries)
            todo = [f for f in todo if f.path not in there]
        return todo

    def _verify(self, destination: Destination, folder: Folder,
                sends: list[Future[None]]) -> None:
        """Once this folder's sends to destination are done, ask the PACS what it holds."""
        for send in sends:
            send.exception()  # wait; failures are recorded per file
        known = self.journal.lookup([f.key for f in folder.ready], destination.name)
        check = [f for f in folder.ready if known[f.key].delivered and not known[f.key].verified]
        if not check:
            return
        if not self.verifier.applies(destination):  # it answers no C-FIND from us (auto)
            self.verifier.rely_on_store(destination, check)
            return
        wrong = self.verifier.verify(destination, folder.patient.id, check)
        folder.to_quarantine.update(wrong)
        if destination is self.settings.destinations[0] and progress.active():
            after = self.journal.lookup([f.key for f in check], destination.name)
            progress.add(folder.name, "listed",
                         sum(after[f.key].verified_by == "c-find" for f in check))

    def _send(self, destination: Destination, transfer_syntax: str,
              files: list[SourceFile], owners: dict[str, Folder], counted: bool,
              sent_as: dict[str, SourceFile] | None = None, note: str = "") -> None:
        """One storescu run; owners maps each file to its folder; counted: its answers
        count on the folders' progress lines; sent_as maps the paths sent (decompressed
        copies) to the files they stand for, whose journal rows get the answers."""
        by_path = sent_as or {f.path: f for f in files}
        recorder = _AnswerRecorder(self.journal, destination.name, by_path,
                                   lambda seconds: self._note_pace(destination.name, seconds),
                                   owners, counted, note)
        def still(path: str, opened: os.stat_result) -> bool:
            """The file opened for storescu is the version stamped (a decompressed copy is
            the scratch file itself)."""
            return sent_as is not None or by_path[path].ident.same_content(Identity.of(opened))

        try:
            results, error = dcmtk.store(destination, list(by_path), transfer_syntax,
                                         on_answer=recorder.add, still=still,
                                         sop_classes={p: f.sop_class for p, f in by_path.items()})
        except (dcmtk.DcmtkMissing, dcmtk.Stopped) as exc:
            results, error = {}, str(exc)
        recorder.flush()
        answered = bool(recorder.recorded)
        with self.pace_lock:
            if answered:
                self.reached.add(destination.name)
            elif error:
                self.unreachable.setdefault(destination.name, error)
        if error:
            warn("%s: %s", destination.label, error)
        unaccepted: dict[str, str] = {}
        for path in by_path:
            result = results.get(path) or dcmtk.StoreResult(dcmtk.Outcome.TRANSIENT, error)
            if result.outcome is dcmtk.Outcome.UNACCEPTED and sent_as is None:
                unaccepted[path] = result.detail
            elif path not in recorder.recorded:
                recorder.add(path, result)
        recorder.flush()
        if unaccepted:
            self._send_decompressed(destination, [by_path[p] for p in unaccepted], unaccepted,
                                    owners, counted)

    def _send_decompressed(self, destination: Destination, files: list[SourceFile],
                           why: dict[str, str], owners: dict[str, Folder],
                           counted: bool) -> None:
        """Files whose transfer syntax the PACS does not accept: a decompressed copy goes
        where DCMTK can make one (lossy sources only with DECOMPRESS_LOSSY), and the answer
        says so; otherwise a refusal no retry can change (quarantined, with the reason)."""
        with scratch_dir(self.settings.import_dir / WORK_DIR_NAME, DECOMPRESSED) as work:
            copies: dict[str, SourceFile] = {}
            refused: list[tuple[FileKey, bool, int, str]] = []
            for index, source in enumerate(files):
                reason = f"{why[source.path]} at {destination.label}"
                tool = dcmtk.decompression_tool(source.transfer_syntax)
                if tool is None:
                    reason += "; DCMTK cannot decompress it"
                elif not tool[1] and not self.settings.decompress_lossy:
                    reason += ("; it is lossy-compressed: DECOMPRESS_LOSSY=true sends it"
                               " decompressed")
                else:
                    copy = str(work / f"{index}.dcm")
                    run = dcmtk.decompress(source.path, copy, source.transfer_syntax)
                    if run.exit_code == 0 and os.path.exists(copy):
                        copies[copy] = source
                        continue
                    reason += (f"; {tool[0]} could not decompress it:"
                               f" {run.said() or run.exit_code}")
                refused.append((source.key, False, self.settings.max_attempts, reason))
            if refused:
                self.journal.record(destination.name, refused)
            if copies:
                self._send(destination, "", list(copies.values()), owners, counted, copies,
                           "; sent decompressed to Explicit VR Little Endian: the PACS"
                           " accepts no transfer syntax of the original")

    def _note_pace(self, destination: str, seconds: float) -> None:
        with self.pace_lock:
            old = self.pace.get(destination)
            self.pace[destination] = seconds if old is None else 0.7 * old + 0.3 * seconds


class _AnswerRecorder:
    """Writes the PACS's answers to the journal while storescu is still running (at most
    every 0.1 s: a few commits a second), so a crash mid-send resends only about the last
    0.1 s of answers (and whatever an orphaned storescu sends after its parent died)."""

    def __init__(self, journal: Journal, destination: str, files: dict[str, SourceFile],
                 on_pace: Callable[[float], None], owners: dict[str, Folder],
                 counted: bool, note: str = "") -> None:
        self.journal = journal
        self.destination = destination
        self.files = files
        # Told this association's pace so far: its time per answer since its first (one
        # gap alone is noise: the thread waited for the interpreter's lock while both cores
        # were busy, and a fast PACS looked slow, split into 4x the storescu starts).
        self.on_pace = on_pace
        self.owners = owners  # file -> its folder
        self.counted = counted  # answers count on the folders' progress lines
        self.note = note  # added to each answer's status (e.g. sent decompressed)
        self.recorded: set[str] = set()
        self.buffer: list[tuple[FileKey, bool, int, str]] = []
        # (study, PatientID, folder) acknowledged: the journal remembers whose a study is
        self.studies: set[tuple[str, str, str]] = set()
        self.studies_recorded: set[tuple[str, str, str]] = set()
        self.last_flush = time.monotonic()
        self.first_answer: float | None = None
        self.answers = 0

    def add(self, path: str, result: dcmtk.StoreResult) -> None:
        source = self.files.get(path)
        if source is None or path in self.recorded:
            return
        self.recorded.add(path)
        now = time.monotonic()
        if self.first_answer is None:
            self.first_answer = now
        else:
            self.answers += 1
            if self.answers == PACE_FIRST or self.answers % PACE_EVERY == 0:
                self.on_pace((now - self.first_answer) / self.answers)
        owner = self.owners.get(source.path)
        if owner is not None and self.counted:
            progress.add(owner.name, "answered")
        if owner is not None and source.study_uid and result.outcome is dcmtk.Outcome.DELIVERED:
            self.studies.add((source.study_uid, owner.patient.id, owner.name))
        metrics.inc("dicom_importer_files_total", destination=self.destination,
                    outcome=result.outcome.value)
        metrics.inc("dicom_importer_bytes_total", source.size, destination=self.destination,
                    outcome=result.outcome.value)
        self.buffer.append((source.key, result.outcome is dcmtk.Outcome.DELIVERED,
                            int(result.outcome is dcmtk.Outcome.PERMANENT),
                            result.detail + self.note))
        if now - self.last_flush > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            studies = self.studies - self.studies_recorded
            self.journal.record(self.destination, self.buffer, studies)
            self.studies_recorded |= studies
            self.buffer = []
        self.last_flush = time.monotonic()


def _smallest_group(seconds_per_file: float | None) -> int:
    """The fewest files worth an association of their own, by the PACS's pace."""
    if seconds_per_file is None:
        return MIN_FILES_PER_ASSOCIATION_UNKNOWN
    if seconds_per_file > SLOW_SECONDS_PER_FILE:
        return MIN_FILES_PER_ASSOCIATION_SLOW
    return MIN_FILES_PER_ASSOCIATION


def _split(files: list[SourceFile], destination: Destination,
           smallest: int) -> list[tuple[str, list[SourceFile]]]:
    """Associations to open: per transfer syntax (storescu proposes compressed syntaxes only
    when told), each split over up to `associations` parallel associations of at least
    `smallest` files."""
    by_syntax: dict[str, list[SourceFile]] = {}
    for source in files:
        by_syntax.setdefault(dcmtk.proposal_for(source.transfer_syntax), []).append(source)
    groups = []
    for syntax, same in by_syntax.items():
        count = max(1, min(destination.associations, len(same) // smallest))
        size = math.ceil(len(same) / count)
        groups += [(syntax, same[i:i + size]) for i in range(0, len(same), size)]
    return groups

