"""One batch: snapshot -> validate -> stamp -> send (and verify) -> archive.

The order of the guarantees: a file is never sent unless a fresh read shows it carries
its folder's identity (stamp.py); never archived unless every required PACS answered
success for it, and listed it where it answers C-FIND (send.py, verify.py); and no crash
at any point loses an original or archives a file twice (stamping behind an intent file,
archiving behind a written-ahead plan, both finished by the next run). Folders are stamped
one after another while the previous one is being sent, so the two cores overlap.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from importer import dcmtk, logs
from importer.archive import Plan, PlanResult, carry_out, free_name, remove_empty_dirs
from importer.config import Settings
from importer.folders import Patient, display, parse_folder_name
from importer.journal import Journal
from importer.logs import error, event, warn
from importer.model import Folder, SourceFile, folder_hash, identity_label
from importer.receipt import build_receipt, receipt_path
from importer.send import Sender
from importer.share import (
    Identity,
    SettleCheck,
    changed_since,
    could_become_dicom,
    image_without_pixels,
)
from importer.stamp import recover_interrupted_stamp, stamp
from importer.verify import Verifier

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


# --- snapshot -----------------------------------------------------------------------------


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
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                left.append((os.path.relpath(os.path.join(dirpath, name), top),
                             "symbolic link, not followed"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
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


@contextlib.contextmanager
def folder_lock(settings: Settings, name: str) -> Iterator[bool]:
    """An exclusive lock per folder in STATE_DIR; yields False if another process has it."""
    if settings.dry_run:
        yield True
        return
    lock_dir = settings.state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{folder_hash(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


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
            _recover_elsewhere(settings, {name for name, _ in matched}, recovered)
        settle = SettleCheck(settings.settle_seconds)
        for name, patient in matched:
            if not locks.enter_context(folder_lock(settings, name)):
                event("INFO", "%s is being processed by another importer; skipped", display(name))
                report.busy.append(name)
                continue
            if not settings.dry_run:
                _recover(settings, name, recovered)
            files, left = list_files(settings.import_dir / name)
            folder = Folder(name, settings.import_dir / name, patient, files, left)
            for rel, why in left:
                warn("%s/%s: %s (left in place)", display(name), display(rel), why)
            _set_aside_unsettled(folder, settle)
            if folder.files or folder.writing:
                folders.append(folder)
        report.folders = folders
        if not folders:
            return report

        all_files = [f.path for folder in folders for f in folder.files]
        event("PHASE 1.5", "Validating %d files in %d folders", len(all_files), len(folders))
        magic = dcmtk.dicom_magic(all_files)  # one call for the batch: cheap
        del all_files
        if settings.dry_run:
            for folder in folders:
                _read_originals(folder, magic, settings)
                _describe(folder, settings)
                _note_writing(folder, settings, noted_writing)
            return report

        journal = Journal(settings.state_dir)
        journal.forget(recovered)
        try:
            with Sender(settings, journal) as sender:
                for folder in folders:
                    # Folder by folder (memory stays flat in the batch's size, and this
                    # overlaps the previous folder's send): read, check, stamp, send.
                    if not folder.files:
                        continue  # only files still being written
                    try:
                        dumps = _read_originals(folder, magic, settings)
                        _remember_held(settings, folder)
                        if not folder.held:
                            stamp(folder, dumps, settings)
                    except dcmtk.Stopped:
                        break  # shutting down: archive what was delivered, leave the rest
                    del dumps
                    folder.ready = _unchanged(folder, folder.ready, "after it was stamped")
                    sender.submit(folder)
            for folder in folders:
                _finish(folder, settings, journal, sender.verifier, batch_stamp)
                _note_writing(folder, settings, noted_writing)
        finally:
            journal.close()
    return report


def _set_aside_unsettled(folder: Folder, settle: SettleCheck) -> None:
    """Files something may still be writing wait for the folder's next quiet period."""
    unsettled = settle.unsettled((f.path, f.ident) for f in folder.files)
    if unsettled:
        folder.writing.update({p: f"still being written: {why}" for p, why in unsettled.items()})
        folder.files = [f for f in folder.files if f.path not in unsettled]


def _unchanged(folder: Folder, files: list[SourceFile], when: str) -> list[SourceFile]:
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


def _read_originals(folder: Folder, magic: dict[str, bool],
                    settings: Settings) -> dict[str, dcmtk.Dump]:
    """[PHASE 1.5] for one folder: one full read of its DICOM files (a truncated file is
    caught here), sorting out non-DICOM files, DICOMDIRs and unreadable files; then the
    two-patients check on what the files said before stamping.

    A file that looks unfinished (unreadable, no DICM magic yet, an image without its pixel
    data) and changed within INCOMPLETE_GRACE is a copy still under way, not a broken file:
    it is left in place; only once it has stayed unchanged that long is it judged."""
    dumps = dcmtk.dump_tags([f.path for f in folder.files if magic[f.path]], ORIGINAL_TAGS)
    folder.files = _unchanged(folder, folder.files, "while being read")
    now = time.time()
    candidates = []
    for source in folder.files:
        dump = dumps.get(source.path)
        young = now - source.ident.changed_at() < settings.incomplete_grace
        if dump is None:
            if young and could_become_dicom(source.path):
                folder.writing[source.path] = (
                    f"incomplete: no DICM magic yet ({source.size} bytes)")
                continue
            warn("Not a DICOM file: %s/%s (archived with its folder, not sent)",
                 display(folder.name), display(source.rel))
            folder.unsent.append(source)
        elif dump.error:
            if young:
                folder.writing[source.path] = f"incomplete: DCMTK cannot read it yet ({dump.error})"
                continue
            folder.to_quarantine[source.path] = f"DCMTK cannot read this file: {dump.error}"
        elif image_without_pixels(
                dump.values, dump.values.get(dcmtk.SOP_CLASS)
                or dump.values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS, ""),
                dcmtk.ROWS, dcmtk.PIXEL_DATA_TAGS):
            if young:
                folder.writing[source.path] = "incomplete: an image without its pixel data yet"
                continue
            folder.to_quarantine[source.path] = (
                "image without pixel data: the header of an image whose pixel data never"
                " arrived (a copy that stopped); get it again from its source")
        elif (dump.values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS) == DICOMDIR_SOP_CLASS
              or os.path.basename(source.path).upper() == "DICOMDIR"):
            folder.unsent.append(source)  # a CD's index, not an image: never sent
        else:
            source.transfer_syntax = dump.values.get(dcmtk.TRANSFER_SYNTAX, "")
            source.sop_uid = dump.values.get(dcmtk.SOP_INSTANCE_UID, "")
            source.study_uid = dump.values.get(dcmtk.STUDY_INSTANCE_UID, "")
            candidates.append(source)
    folder.files = candidates
    _check_patients(folder, dumps, settings)
    return dumps


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


def _recover(settings: Settings, folder_name: str, recovered: list[str]) -> None:
    """Finish what a crashed run left half done in this folder, before looking at it."""
    if restored := recover_interrupted_stamp(settings, folder_name):
        warn("%s: an interrupted run left %d files half-stamped; originals restored",
             display(folder_name), restored)
    plan_file = _plan_path(settings, folder_name)
    if (plan := Plan.load(plan_file)) is not None:
        outcome = carry_out(plan)
        recovered += outcome.moved
        if outcome.failed or outcome.receipt_error:
            warn("%s: the archive step an earlier run began is still not complete: %s",
                 display(folder_name), "; ".join([*outcome.failed.values()][:1]
                                                 + [outcome.receipt_error or ""]).strip("; "))
        else:
            plan_file.unlink()
            warn("%s: finished the archive step an earlier run began (%d files moved now)",
                 display(folder_name), len(outcome.moved))


def _recover_elsewhere(settings: Settings, skip: set[str], recovered: list[str]) -> None:
    """Archive steps left unfinished for folders no longer in the import dir (all their
    files had moved; say, only the receipt was missing)."""
    for plan_file in sorted((settings.state_dir / "archiving").glob("*.json")):
        plan = Plan.load(plan_file)
        if plan is None or plan.folder in skip:
            continue
        with folder_lock(settings, plan.folder) as acquired:
            if acquired:
                _recover(settings, plan.folder, recovered)


def _plan_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "archiving" / f"{folder_hash(folder_name)}.json"


def _finish(folder: Folder, settings: Settings, journal: Journal, verifier: Verifier,
            batch_stamp: str) -> None:
    """Archive what every required PACS has (and, where it answers C-FIND, lists under
    the folder's ID); quarantine what cannot be sent; leave the rest; report."""
    if folder.held:
        event("INFO", "%s: held — %s", display(folder.name), folder.held)
        return
    required = [d for d in settings.destinations if d.required]
    deliveries = {d.name: journal.lookup([f.key for f in folder.ready], d.name)
                  for d in settings.destinations}
    to_archive: list[SourceFile] = []
    for source in folder.ready:
        if source.path in folder.to_quarantine:
            continue  # e.g. filed under another patient: never archived silently
        state = {d.name: deliveries[d.name][source.key] for d in settings.destinations}
        missing = [d for d in required if not state[d.name].delivered]
        unverified = [d for d in required if state[d.name].delivered
                      and not state[d.name].verified and verifier.applies(d)]
        if not missing and not unverified:
            to_archive.append(source)
            continue
        lost = [d for d in missing if state[d.name].not_found >= settings.max_attempts]
        refused = [d for d in missing if state[d.name].refusals >= settings.max_attempts]
        if lost or refused:
            folder.to_quarantine[source.path] = "; ".join(
                [f"refused by {d.label} {state[d.name].refusals} times:"
                 f" {state[d.name].last_error}" for d in refused]
                + [f"acknowledged by {d.label} but not found by C-FIND"
                   f" {state[d.name].not_found} times" for d in lost])
        else:
            folder.pending[source.path] = "; ".join(
                [f"not yet at {d.label}: {state[d.name].last_error}" for d in missing]
                + [f"not yet verified at {d.label}" for d in unverified])
    for d in settings.destinations:
        if not d.required:
            lacking = sum(not deliveries[d.name][f.key].delivered for f in folder.ready)
            if lacking:
                warn("%s: %d files did not reach optional destination %s",
                     display(folder.name), lacking, d.label)
    folder.sent = len(to_archive)
    ready_paths = {f.path for f in folder.ready}
    for source in folder.files:  # not stamped at all, e.g. the importer is stopping
        if not (source.path in ready_paths or source.path in folder.to_quarantine
                or source.path in folder.pending or source.path in folder.writing):
            folder.pending[source.path] = "not processed in this run"

    # Loose ends of a folder (not-DICOM files, a DICOMDIR) go once its images are done.
    if not folder.pending and not folder.writing:
        to_archive += folder.unsent
    # The last look before anything is moved: exactly what was read, stamped and sent, and
    # nobody writing it. Otherwise it stays; its next version is read and sent afresh.
    to_archive = _unchanged(folder, to_archive, "after it was sent")
    by_path = {f.path: f for f in folder.files + folder.unsent}
    _unchanged(folder, [by_path[p] for p in list(folder.to_quarantine) if p in by_path],
               "before its quarantine")
    target_root = settings.archive_dir / batch_stamp / folder.name
    failed_root = settings.failed_dir / batch_stamp / folder.name
    if to_archive:
        event("PHASE 3", "%s: archiving %d files to %s", display(folder.name), len(to_archive),
              display(str(target_root)))

    # Decide every target first and write the plan down; then carry it out (see archive.py).
    plan, taken = Plan(folder.name), set()
    placed: list[tuple[SourceFile, Path]] = []
    for source in to_archive:
        target = free_name(target_root / source.rel, taken)
        taken.add(target)
        plan.moves.append((source.path, str(target)))
        placed.append((source, target))
    quarantine_rel = {}
    for path, reason in folder.to_quarantine.items():
        rel = by_path[path].rel if path in by_path else os.path.relpath(path, folder.path)
        target = free_name(failed_root / rel, taken)
        taken.add(target)
        plan.moves.append((path, str(target)))
        plan.reasons[str(target)] = f"{folder.name}/{rel}\n{reason}"
        quarantine_rel[path] = rel
    if placed:
        plan.receipt_path = str(receipt_path(target_root))
        plan.receipt = build_receipt(target_root, folder, placed, deliveries, settings, verifier)
    outcome = PlanResult()
    if plan.moves:
        plan_file = _plan_path(settings, folder.name)
        plan.save(plan_file)
        outcome = carry_out(plan)
        if not outcome.failed and not outcome.receipt_error:
            plan_file.unlink()  # else the next run carries out the rest of it first

    archived = outcome.moved
    for path, why in outcome.failed.items():
        what = "quarantine" if path in folder.to_quarantine else "archive"
        folder.pending[path] = f"cannot {what}: {why}"
    for path in archived:
        if path in quarantine_rel:
            warn("%s/%s quarantined in %s: %s", display(folder.name),
                 display(quarantine_rel[path]), display(str(failed_root)),
                 folder.to_quarantine[path])
            folder.quarantined += 1
    if outcome.receipt_error:
        error("%s: the receipt %s could not be written: %s", display(folder.name),
              display(plan.receipt_path or ""), outcome.receipt_error)
    journal.forget(archived)
    remove_empty_dirs(folder.path)
    # One line per reason, not per file: a PACS that is down must not write 10,000 lines.
    by_reason: dict[str, list[str]] = {}
    for path, why in folder.pending.items():
        by_reason.setdefault(why, []).append(path)
        event("INFO", "%s: left for retry: %s", display(os.path.relpath(path, settings.import_dir)),
              why, level=logging.DEBUG)  # every file, in the JSON logs
    for why, paths in by_reason.items():
        first = display(os.path.relpath(paths[0], settings.import_dir))
        if len(paths) == 1:
            warn("%s: left for retry: %s", first, why)
        else:
            warn("%s and %d more files: left for retry: %s", first, len(paths) - 1, why)
    event("INFO", "%s: %d sent, %d not DICOM (archived unsent), %d quarantined,"
          " %d left for retry, %d still being written, %d left in place, %.2f s",
          display(folder.name), folder.sent,
          len(folder.unsent) if not (folder.pending or folder.writing) else 0,
          folder.quarantined, len(folder.pending), len(folder.writing), len(folder.left),
          time.monotonic() - folder.started)


def _note_writing(folder: Folder, settings: Settings, noted: set[str] | None) -> None:
    """One [INFO] per folder for files still being written that were not reported yet
    (every file, every time, in the JSON log)."""
    fresh = []
    for path, why in sorted(folder.writing.items()):
        event("INFO", "%s: left in place: %s", display(os.path.relpath(path, settings.import_dir)),
              why, level=logging.DEBUG)
        if noted is None or path not in noted:
            fresh.append((path, why))
    if noted is not None:
        noted.difference_update(p for p in list(noted)
                                if p.startswith(str(folder.path) + os.sep)
                                and p not in folder.writing)
        noted.update(folder.writing)
    if fresh:
        path, why = fresh[0]
        more = f" (and {len(fresh) - 1} more files)" if len(fresh) > 1 else ""
        event("INFO", "%s/%s%s: still being written or incomplete, left in place for the next"
              " quiet period: %s; judged only after %d s unchanged (INCOMPLETE_GRACE)",
              display(folder.name), display(os.path.relpath(path, folder.path)), more, why,
              settings.incomplete_grace)
