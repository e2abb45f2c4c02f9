"""One batch: snapshot -> validate (validate.py) -> stamp -> send (and verify) -> archive.

The order of the guarantees: a file is taken only once settled, and every step that
cannot be undone first checks it is still what was read (snapshot.py, share.py); it is
never sent unless a fresh read shows it carries
its folder's identity (stamp.py); never archived unless every required PACS answered
success for it, and listed it where it answers C-FIND (send.py, verify.py); and no crash
at any point loses an original or archives a file twice (stamping behind an intent file,
archiving behind a written-ahead plan, both finished by the next run). Folders are stamped
one after another while the previous one is being sent, so the two cores overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from importer import dcmtk, logs
from importer.config import Destination, Settings
from importer.finish import finish, note_writing, recover, recover_elsewhere
from importer.finisher import Finisher
from importer.folders import Patient, display
from importer.journal import Journal
from importer.logs import event
from importer.model import Folder, SourceFile, identity_label
from importer.reconcile import Reconciler, reconcile
from importer.release import apply_release, keep_covered, remember_held
from importer.send import Sender
from importer.snapshot import (
    listed_groups,
    scan_import_dir,
    unchanged,
    warn_unmatched,
)
from importer.sniff import OTHER, count_words
from importer.stamp import stamp
from importer.unpack import forget_gone
from importer.validate import check_duplicate_uids, classify, read_originals


@dataclass
class BatchReport:
    folders: list[Folder] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)  # destinations that answered a send
    unreachable: dict[str, str] = field(default_factory=dict)  # took no association: why

    @property
    def exit_code(self) -> int:
        if any(f.pending or f.quarantined or f.held or f.writing for f in self.folders):
            return 1
        return 3 if self.busy else 0


def run_batch(settings: Settings, *, quiet_unmatched: set[str] | None = None,
              only: set[str] | None = None, noted_writing: set[str] | None = None,
              down: dict[str, str] | None = None,
              wait_for_settle: bool = False) -> BatchReport:
    """Process every patient folder in the import dir once (or only the named ones).

    Only settled files are taken: see share.py. noted_writing (watch) holds the files
    already reported as still being written, so each is reported once, not every period.
    down (watch): destinations known to be down (name -> since when, in words): not tried,
    and what waits for them is not repeated per folder (outage.py tells that story).
    wait_for_settle (run-once, started right after a copy): files kept back only by their
    age, which nobody is writing, are waited for once and taken in this batch.
    """
    down = down or {}
    report = BatchReport()
    batch_stamp = time.strftime("%Y%m%d_%H%M%S")
    matched, report.unmatched = scan_import_dir(settings)
    warn_unmatched(report.unmatched, quiet_unmatched)
    if only is not None:
        matched = [(name, patient) for name, patient in matched if name in only]

    with contextlib.ExitStack() as locks:
        if not settings.log_patient_names:
            locks.enter_context(logs.hidden_names(patient.name for _, patient in matched))
        folders = report.folders  # every folder taken, as it is listed
        recovered: list[str] = []  # sources an interrupted archive step has now moved
        if not settings.dry_run:
            recover_elsewhere(settings, {name for name, _ in matched}, recovered)
            forget_gone(settings)  # unpacked archives' states of folders all archived
        # Listed a group at a time, while the previous group is being sent: memory stays
        # flat in the size of the backlog (50,000 files listed at once cost ~25 MB).
        groups = listed_groups(settings, matched, locks, taken=folders, busy=report.busy,
                               wait_for_settle=wait_for_settle,
                               prepare=None if settings.dry_run else
                               lambda name: recover(settings, name, recovered))
        first = next(groups, None)
        if first is None:
            return report
        groups = itertools.chain([first], groups)
        if settings.dry_run:
            _dry_run(settings, matched, groups, noted_writing, folders)
            return report

        journal = Journal(settings.state_dir)
        finished: set[int] = set()
        quiet = {d.label for d in settings.destinations if d.name in down}

        def finish_chunk(chunk: list[Folder]) -> None:
            for folder in chunk:
                finish(folder, settings, journal, sender.verifier, batch_stamp, quiet)
                note_writing(folder, settings, noted_writing)
                folder.forget_files()
                finished.add(id(folder))

        reconciler: Reconciler | None = None
        try:
            with Sender(settings, journal, down) as sender:
                finisher = Finisher(finish_chunk)  # each chunk archived once its sends end
                try:
                    reconciler = _reconciler(settings, matched, sender.verifier.note_refused,
                                             down, journal)
                    for chunk, magic in _chunks(groups, journal, recovered):
                        # Many folders' files per tool call (a tool's start costs more than
                        # a small folder's files), a chunk at a time (memory stays flat in
                        # the batch's size, and this overlaps the previous chunk's send):
                        # read, check, stamp (one dcmodify per folder), verify, send.
                        try:
                            dumps = read_originals(chunk, magic)
                            for folder in chunk:
                                classify(folder, dumps, settings)
                            if reconciler is not None:  # is it the right patient?
                                reconcile(chunk, dumps, settings, reconciler)
                            for folder in chunk:
                                apply_release(folder, journal)
                                remember_held(settings, folder)
                            work = _stamp_and_send(chunk, dumps, settings, journal, sender)
                        except dcmtk.Stopped:
                            break  # shutting down: archive what was delivered, leave the rest
                        del dumps
                        finisher.add(chunk, work)
                finally:
                    finisher.close()  # (stopping: the sends end at once, then their chunks)
            for folder in folders:  # only files still being written, or the run stopped
                if id(folder) not in finished:
                    finish(folder, settings, journal, sender.verifier, batch_stamp, quiet)
                    note_writing(folder, settings, noted_writing)
            for folder in folders:
                if folder.released is not None and not folder.path.exists():
                    journal.drop_release(folder.name)  # all of it archived
            report.reached, report.unreachable = sender.reached, sender.unreachable
        finally:
            if reconciler is not None:
                reconciler.close()
            journal.close()
    return report


# A folder of more files than this is stamped and sent in parts of SLICE_FILES, so that
# its first part is on its way while the next is stamped (a 20,000-file study is not
# stamped whole before its first file goes), and its dumps go as its parts are stamped.
SLICE_FILES = 1000


def _stamp_and_send(chunk: list[Folder], dumps: dict[str, dcmtk.Dump], settings: Settings,
                    journal: Journal, sender: Sender) -> list[Future[None]]:
    """Stamp the chunk's folders (one dcmodify per folder) and send what carries their
    identity; returns the sends and verifications begun."""
    parts = _parts(chunk)
    work: list[Future[None]] = []
    try:
        for part in parts:
            stamp([f for f in part if not f.held], dumps, settings)
            for folder in part:
                keep_covered(folder, journal)
                folder.ready = unchanged(folder, folder.ready, "after it was stamped")
                check_duplicate_uids(folder, settings)
            if len(parts) == 1:
                return sender.submit(part)
            work += sender.submit(part, verify=False)
            for source in part[0].files:
                dumps.pop(source.path, None)
    finally:
        if len(parts) > 1:  # (also when stopped midway: what was sent is finished)
            chunk[0].ready = [f for (view,) in parts for f in view.ready]
    return work + sender.verify_when_sent(chunk, work)


def _parts(chunk: list[Folder]) -> list[list[Folder]]:
    """The chunk itself, or a big folder as views of its files in parts (sharing its
    verdicts; the files that share a SOP Instance UID in one part, where their contents
    are compared)."""
    if len(chunk) != 1 or chunk[0].held or len(chunk[0].files) <= 2 * SLICE_FILES:
        return [chunk]
    folder = chunk[0]
    by_uid: dict[str, list[SourceFile]] = {}
    for source in folder.files:
        by_uid.setdefault(source.sop_uid or source.path, []).append(source)
    parts: list[list[SourceFile]] = [[]]
    for same in by_uid.values():
        if parts[-1] and len(parts[-1]) + len(same) > SLICE_FILES:
            parts.append([])
        parts[-1] += same
    return [[dataclasses.replace(folder, files=files, ready=[])] for files in parts]


def _reconciler(settings: Settings, matched: list[tuple[str, Patient]],
                on_refused: Callable[[Destination, str, str], None] | None = None,
                down: dict[str, str] | None = None,
                journal: Journal | None = None) -> Reconciler | None:
    """Ask what the site knows of every folder's patient ID, from the start of the batch:
    the answers arrive while the first chunks are read (RECONCILE=off: not at all)."""
    if settings.reconcile == "off":
        return None
    reconciler = Reconciler(settings, on_refused, down, journal)
    reconciler.ask(patient.id for _name, patient in matched)
    return reconciler


def _dry_run(settings: Settings, matched: list[tuple[str, Patient]],
             groups: Iterator[list[Folder]], noted_writing: set[str] | None,
             folders: list[Folder]) -> None:
    """What a run would do, folder by folder; nothing changes (the PACS are only asked)."""
    reconciler = _reconciler(settings, matched)
    try:
        for chunk, magic in _chunks(groups, None, []):
            dumps = read_originals(chunk, magic)
            for folder in chunk:
                classify(folder, dumps, settings)
            if reconciler is not None:
                reconcile(chunk, dumps, settings, reconciler)
            for folder in chunk:
                _describe(folder, settings)
    finally:
        if reconciler is not None:
            reconciler.close()
    for folder in folders:
        note_writing(folder, settings, noted_writing)


# Folders are read, stamped, verified and sent a chunk at a time: up to this many files.
# Each chunk costs two dcmdump starts (~20 ms of CPU each: the data dictionary) and a
# storescu start (~40 ms); at 200 files a chunk that was a sixth of a 50,000-file drain's CPU.
CHUNK_FILES = 1000


def _chunks(groups: Iterator[list[Folder]], journal: Journal | None,
            recovered: list[str]) -> Iterator[tuple[list[Folder], dict[str, bool]]]:
    """Consecutive folders with files to read, up to CHUNK_FILES files a chunk (a larger
    folder is a chunk of its own), and which of their files carry the DICM magic (one
    dcmftest per listed group). Ends early, quietly, when the importer is told to stop
    while a group is being listed."""
    while True:
        try:
            group = next(groups)
        except (StopIteration, dcmtk.Stopped):
            return
        if journal is not None:  # what the recovery of their archive steps moved
            journal.forget(recovered)
            recovered.clear()
        paths = [f.path for folder in group for f in folder.files]
        if not paths:
            continue
        event("PHASE 1.5", "Validating %d files in %d folders", len(paths), len(group))
        magic = dcmtk.dicom_magic(paths)  # one call for the group: cheap
        del paths
        chunk: list[Folder] = []
        count = 0
        for folder in group:
            if not folder.files:
                continue  # only files still being written
            if chunk and count + len(folder.files) > CHUNK_FILES:
                yield chunk, magic
                chunk, count = [], 0
            chunk.append(folder)
            count += len(folder.files)
        if chunk:
            yield chunk, magic


def _describe(folder: Folder, settings: Settings) -> None:
    targets = ", ".join(d.label for d in settings.destinations)
    unsent = count_words([folder.unsent_kinds.get(f.path, OTHER) for f in folder.unsent])
    event("DRY-RUN", "%s: would stamp %d files as %s and send them to %s; "
          "%s to archive unsent; %d unreadable (quarantine); %d still being written"
          " (leave)%s",
          display(folder.name), len(folder.files), identity_label(folder.patient, settings),
          targets, ", ".join(unsent) or "nothing", len(folder.to_quarantine), len(folder.writing),
          f"; HELD: {folder.held}" if folder.held else "")
