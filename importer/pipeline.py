"""One batch: snapshot -> validate -> stamp -> send (and verify) -> archive.

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
import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from importer import dcmtk, logs, progress
from importer.config import Settings
from importer.finish import finish, note_writing, recover, recover_elsewhere
from importer.folders import display
from importer.journal import Journal
from importer.logs import event, warn
from importer.model import Folder, SourceFile, folder_hash, identity_label
from importer.send import Sender
from importer.share import SettleCheck, could_become_dicom, image_without_pixels
from importer.snapshot import (
    folder_lock,
    list_files,
    scan_import_dir,
    set_aside_unsettled,
    unchanged,
    warn_unmatched,
)
from importer.stamp import stamp

ORIGINAL_TAGS = (
    dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET, dcmtk.BIRTH_DATE, dcmtk.SEX,
    dcmtk.SOP_INSTANCE_UID, dcmtk.STUDY_INSTANCE_UID, dcmtk.MEDIA_STORAGE_SOP_CLASS,
    dcmtk.TRANSFER_SYNTAX, dcmtk.SOP_CLASS, dcmtk.ROWS, *dcmtk.PIXEL_DATA_TAGS,
)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class BatchReport:
    folders: list[Folder] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if any(f.pending or f.quarantined or f.held or f.writing for f in self.folders):
            return 1
        return 3 if self.busy else 0


def run_batch(settings: Settings, *, quiet_unmatched: set[str] | None = None,
              only: set[str] | None = None, noted_writing: set[str] | None = None) -> BatchReport:
    """Process every patient folder in the import dir once (or only the named ones).

    Only settled files are taken: see share.py. noted_writing (watch) holds the files
    already reported as still being written, so each is reported once, not every period.
    """
    report = BatchReport()
    batch_stamp = time.strftime("%Y%m%d_%H%M%S")
    matched, report.unmatched = scan_import_dir(settings)
    warn_unmatched(report.unmatched, quiet_unmatched)
    if only is not None:
        matched = [(name, patient) for name, patient in matched if name in only]

    with contextlib.ExitStack() as locks:
        if not settings.log_patient_names:
            locks.enter_context(logs.hidden_names(patient.name for _, patient in matched))
        folders: list[Folder] = []
        recovered: list[str] = []  # sources an interrupted archive step has now moved
        if not settings.dry_run:
            recover_elsewhere(settings, {name for name, _ in matched}, recovered)
        settle = SettleCheck(settings.settle_seconds)
        for name, patient in matched:
            if not locks.enter_context(folder_lock(settings, name)):
                event("INFO", "%s is being processed by another importer; skipped", display(name))
                report.busy.append(name)
                continue
            if not settings.dry_run:
                recover(settings, name, recovered)
            files, left = list_files(settings.import_dir / name)
            folder = Folder(name, settings.import_dir / name, patient, files, left)
            for rel, why in left:
                warn("%s/%s: %s (left in place)", display(name), display(rel), why)
            # Its clock restarts after the recovery above: the originals it put back did
            # not change "after now".
            set_aside_unsettled(folder, settle.from_now())
            if folder.files or folder.writing:
                folders.append(folder)
                progress.folder(name, len(folder.files))
        report.folders = folders
        if not folders:
            return report

        all_files = [f.path for folder in folders for f in folder.files]
        event("PHASE 1.5", "Validating %d files in %d folders", len(all_files), len(folders))
        magic = dcmtk.dicom_magic(all_files)  # one call for the batch: cheap
        del all_files
        if settings.dry_run:
            for chunk in _chunks(folders):
                dumps = _read_originals(chunk, magic)
                for folder in chunk:
                    _classify(folder, dumps, settings)
                    _describe(folder, settings)
            for folder in folders:
                note_writing(folder, settings, noted_writing)
            return report

        journal = Journal(settings.state_dir)
        journal.forget(recovered)
        finished: set[int] = set()

        def finish_done(under_way: list[tuple[list[Folder], list[Future[None]]]],
                        wait: bool = False) -> list[tuple[list[Folder], list[Future[None]]]]:
            """Archive each chunk once its sends and verifications are done: one slow
            chunk does not hold back the others' archiving."""
            still = []
            for chunk, work in under_way:
                if wait or all(f.done() for f in work):
                    for folder in chunk:
                        finish(folder, settings, journal, sender.verifier, batch_stamp)
                        note_writing(folder, settings, noted_writing)
                        finished.add(id(folder))
                else:
                    still.append((chunk, work))
            return still

        try:
            under_way: list[tuple[list[Folder], list[Future[None]]]] = []
            with Sender(settings, journal) as sender:
                for chunk in _chunks(folders):
                    # Many folders' files per tool call (a tool's start costs more than a
                    # small folder's files), a chunk at a time (memory stays flat in the
                    # batch's size, and this overlaps the previous chunk's send): read,
                    # check, stamp (one dcmodify per folder), verify, send.
                    try:
                        dumps = _read_originals(chunk, magic)
                        for folder in chunk:
                            _classify(folder, dumps, settings)
                            _remember_held(settings, folder)
                        stamp([f for f in chunk if not f.held], dumps, settings)
                    except dcmtk.Stopped:
                        break  # shutting down: archive what was delivered, leave the rest
                    del dumps
                    for folder in chunk:
                        folder.ready = unchanged(folder, folder.ready, "after it was stamped")
                        _check_duplicate_uids(folder, settings)
                    under_way = finish_done([*under_way, (chunk, sender.submit(chunk))])
            finish_done(under_way, wait=True)
            for folder in folders:  # only files still being written, or the run stopped
                if id(folder) not in finished:
                    finish(folder, settings, journal, sender.verifier, batch_stamp)
                    note_writing(folder, settings, noted_writing)
        finally:
            journal.close()
    return report


# Folders are read, stamped, verified and sent a chunk at a time: up to this many files.
CHUNK_FILES = 200


def _chunks(folders: list[Folder]) -> Iterator[list[Folder]]:
    """Consecutive folders with files to read, up to CHUNK_FILES files a chunk (a larger
    folder is a chunk of its own)."""
    chunk: list[Folder] = []
    count = 0
    for folder in folders:
        if not folder.files:
            continue  # only files still being written
        if chunk and count + len(folder.files) > CHUNK_FILES:
            yield chunk
            chunk, count = [], 0
        chunk.append(folder)
        count += len(folder.files)
    if chunk:
        yield chunk


def _read_originals(folders: list[Folder], magic: dict[str, bool]) -> dict[str, dcmtk.Dump]:
    """[PHASE 1.5] one full read of the folders' DICOM files, in one dcmdump (per argv
    chunk): a truncated file is caught here."""
    paths = [f.path for folder in folders for f in folder.files]
    dumps = dcmtk.dump_tags([p for p in paths if magic[p]], ORIGINAL_TAGS)
    # Without the preamble and "DICM" a data set is still DICOM if DCMTK reads it, with
    # its SOP Class and Instance UIDs (stamping writes it back as a file with meta header).
    for path, dump in dcmtk.dump_tags([p for p in paths if not magic[p]], ORIGINAL_TAGS).items():
        if not dump.error and _has_sop_uids(dump):
            dumps[path] = dump
    return dumps


def _classify(folder: Folder, dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Sort out one folder's non-DICOM files, DICOMDIRs and unreadable files from what
    was read; then the two-patients check on what the files said before stamping.

    A file that looks unfinished (unreadable, no DICM magic yet, an image without its pixel
    data) and changed within INCOMPLETE_GRACE is a copy still under way, not a broken file:
    it is left in place; only once it has stayed unchanged that long is it judged."""
    folder.files = unchanged(folder, folder.files, "while being read")
    now = time.time()
    candidates = []
    for source in folder.files:
        dump = dumps.get(source.path)
        young = now - source.ident.changed_at() < settings.incomplete_grace
        dicomdir = dump is not None and _is_dicomdir(source, dump)
        if dump is None:
            if young and could_become_dicom(source.path):
                folder.writing[source.path] = (
                    f"incomplete: no DICM magic yet ({source.size} bytes)")
                continue
            warn("Not a DICOM file: %s/%s (archived with its folder, not sent)",
                 display(folder.name), display(source.rel))
            folder.unsent.append(source)
        elif unfinished := _looks_unfinished(dump, dicomdir):
            while_young, once_old = unfinished
            if young:
                folder.writing[source.path] = f"incomplete: {while_young}"
                continue
            folder.to_quarantine[source.path] = once_old
        elif dicomdir:
            folder.unsent.append(source)  # a CD's index, not an image: never sent
        else:
            source.transfer_syntax = dump.values.get(dcmtk.TRANSFER_SYNTAX, "")
            source.sop_uid = dump.values.get(dcmtk.SOP_INSTANCE_UID, "")
            source.study_uid = dump.values.get(dcmtk.STUDY_INSTANCE_UID, "")
            candidates.append(source)
    folder.files = candidates
    _check_patients(folder, dumps, settings)


def _check_patients(folder: Folder, dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Two people in one folder (two CDs copied together) must never be merged."""
    values = [dumps[f.path].values for f in folder.files]
    births = {v.get(dcmtk.BIRTH_DATE) for v in values} - {None, ""}
    sexes = {v.get(dcmtk.SEX) for v in values} - {None, ""}
    ids = {v.get(dcmtk.PATIENT_ID) for v in values} - {None, ""}
    if len(births) > 1 or len(sexes) > 1:
        what = (f"birth dates {sorted(births)}" if len(births) > 1 else "") + (
            f" sexes {sorted(sexes)}" if len(sexes) > 1 else "")
        message = f"files disagree on {what.strip()}: this folder may hold two patients"
        if settings.mixed_patients == "hold":
            folder.held = message
            warn("%s: %s; held, nothing stamped or sent (MIXED_PATIENTS=hold)",
                 display(folder.name), message)
        elif settings.mixed_patients == "warn":
            warn("%s: %s; sending anyway (MIXED_PATIENTS=warn)", display(folder.name), message)
    elif len(ids) > 1:
        warn("%s: files carry %d different original patient IDs; birth date and sex agree,"
             " so they are stamped as one patient", display(folder.name), len(ids))


def _remember_held(settings: Settings, folder: Folder) -> None:
    """Held folders are listed by `importer status` until a person sorts them out."""
    note = settings.state_dir / "held" / f"{folder_hash(folder.name)}.txt"
    if folder.held:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(f"{folder.name}\n{folder.held}\n", encoding="utf-8",
                        errors="surrogateescape")
    else:
        note.unlink(missing_ok=True)


def _describe(folder: Folder, settings: Settings) -> None:
    targets = ", ".join(d.label for d in settings.destinations)
    event("DRY-RUN", "%s: would stamp %d files as %s and send them to %s; "
          "%d not DICOM (archive unsent); %d unreadable (quarantine); %d still being written"
          " (leave)%s",
          display(folder.name), len(folder.files), identity_label(folder.patient, settings),
          targets, len(folder.unsent), len(folder.to_quarantine), len(folder.writing),
          f"; HELD: {folder.held}" if folder.held else "")


def _check_duplicate_uids(folder: Folder, settings: Settings) -> None:
    """Files that share a SOP Instance UID: the PACS holds one instance per UID. The same
    image twice (a CD copied twice) is fine; different content under one UID is named, and
    archived (the PACS kept one of them) or quarantined (DUPLICATE_UIDS=quarantine)."""
    by_uid: dict[str, list[SourceFile]] = {}
    for source in folder.ready:
        if source.sop_uid:
            by_uid.setdefault(source.sop_uid, []).append(source)
    for uid, same in by_uid.items():
        if len(same) < 2:
            continue
        digests = {f.path: _digest(f.path) for f in same}
        first = same[0]
        differing = [f for f in same[1:] if digests[f.path] != digests[first.path]]
        for f in same[1:]:
            folder.duplicates[f.path] = first.rel
        if not differing:
            continue
        names = ", ".join(display(f.rel) for f in differing)
        if settings.duplicate_uids == "quarantine":
            for f in differing:
                folder.to_quarantine[f.path] = (
                    f"same SOP Instance UID {uid} as {first.rel} with different content: a PACS"
                    " keeps one instance per UID (DUPLICATE_UIDS=quarantine)")
            folder.ready = [f for f in folder.ready if f.path not in folder.to_quarantine]
        warn("%s: %s carry the SOP Instance UID of %s with different content; a PACS keeps"
             " one of them (%s)", display(folder.name), names, display(first.rel),
             "quarantined" if settings.duplicate_uids == "quarantine" else "sent and archived")


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _has_sop_uids(dump: dcmtk.Dump) -> bool:
    """What a C-STORE needs of a data set: its SOP Class and Instance UIDs."""
    return bool(dump.values.get(dcmtk.SOP_CLASS) and dump.values.get(dcmtk.SOP_INSTANCE_UID))


def _is_dicomdir(source: SourceFile, dump: dcmtk.Dump) -> bool:
    return (dump.values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS) == DICOMDIR_SOP_CLASS
            or os.path.basename(source.path).upper() == "DICOMDIR")


def _looks_unfinished(dump: dcmtk.Dump, dicomdir: bool) -> tuple[str, str] | None:
    """For a file that looks cut short: why it may still be arriving, and the quarantine
    reason once it has stayed so for INCOMPLETE_GRACE. None: it looks whole."""
    values = dump.values
    if dump.error:
        return (f"DCMTK cannot read it yet ({dump.error})",
                f"DCMTK cannot read this file: {dump.error}")
    sop_class = values.get(dcmtk.SOP_CLASS) or values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS, "")
    if image_without_pixels(values, sop_class, dcmtk.ROWS, dcmtk.PIXEL_DATA_TAGS):
        return ("an image without its pixel data yet",
                "image without pixel data: the header of an image whose pixel data never"
                " arrived (a copy that stopped); get it again from its source")
    if not dicomdir and not _has_sop_uids(dump):
        return ("no SOP Class or Instance UID yet",
                "no SOP Class UID or SOP Instance UID in the data set: a C-STORE cannot carry"
                " it (fix it at its source)")
    return None
