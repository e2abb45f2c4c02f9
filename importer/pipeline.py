"""One batch: snapshot -> validate -> stamp -> verify -> send -> archive.

The order of the guarantees: a file is never sent unless a fresh read shows it carries
its folder's identity; never archived unless every required PACS answered success for
it; never quarantined or archived by a crash halfway (originals are only replaced by a
verified copy, atomically). Folders are stamped one after another while the previous
folder is being sent, so the two cores overlap DCMTK's work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from importer import dcmtk, logs
from importer.archive import Outcome, Plan, carry_out, free_name, remove_empty_dirs
from importer.config import Destination, Settings
from importer.folders import Patient, display, parse_folder_name
from importer.journal import FileKey, Journal
from importer.logs import error, event, warn
from importer.receipt import build_receipt, receipt_path
from importer.verify import Verifier

WORK_DIR_NAME = ".importer-work"
MIN_FILES_PER_ASSOCIATION = 100  # below that, one more storescu costs more than it gains
UTF8_CHARSETS = ("", "ISO_IR 6", "ISO_IR 192")
# Korean in the wild: (0008,0005) says "ISO_IR 149" (or "ISO 2022 IR 149" as value 1), which
# DCMTK refuses. Both name KS X 1001, which DICOM only defines with code extensions, as
# "\ISO 2022 IR 149". A working copy is relabelled so and converted; dcmconv then accepts
# exactly the text that carries the ESC $ ) C designation DICOM requires before Korean in
# every value/component, and fails loudly (the file is quarantined) on plain EUC-KR.
RELABEL_CHARSETS = {"ISO_IR 149": "\\ISO 2022 IR 149", "ISO 2022 IR 149": "\\ISO 2022 IR 149"}
ORIGINAL_TAGS = (
    dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET, dcmtk.BIRTH_DATE, dcmtk.SEX,
    dcmtk.SOP_INSTANCE_UID, dcmtk.STUDY_INSTANCE_UID, dcmtk.MEDIA_STORAGE_SOP_CLASS,
    dcmtk.TRANSFER_SYNTAX,
)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class SourceFile:
    path: str  # absolute; undecodable bytes kept as surrogate escapes
    rel: str
    size: int
    mtime_ns: int
    transfer_syntax: str = ""  # from the first full read; stamping keeps it
    sop_uid: str = ""  # for C-FIND verification and the receipt
    study_uid: str = ""

    @property
    def key(self) -> FileKey:
        return FileKey(self.path, self.size, self.mtime_ns)


@dataclass
class Folder:
    name: str
    path: Path
    patient: Patient
    files: list[SourceFile]
    left: list[tuple[str, str]] = field(default_factory=list)  # (rel, why), stays in place
    unsent: list[SourceFile] = field(default_factory=list)  # not DICOM / DICOMDIR: archived
    to_quarantine: dict[str, str] = field(default_factory=dict)  # path -> reason
    ready: list[SourceFile] = field(default_factory=list)  # verified identity, sendable
    pending: dict[str, str] = field(default_factory=dict)  # path -> why it waits for retry
    held: str | None = None
    sent: int = 0
    archived: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class BatchReport:
    folders: list[Folder] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.errors or any(f.pending or f.quarantined or f.held for f in self.folders):
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
                files.append(SourceFile(path, rel, st.st_size, st.st_mtime_ns))
    return files, left


@contextlib.contextmanager
def folder_lock(settings: Settings, name: str) -> Iterator[bool]:
    """An exclusive lock per folder in STATE_DIR; yields False if another process has it."""
    if settings.dry_run:
        yield True
        return
    lock_dir = settings.state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{_folder_hash(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _folder_hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]


# --- the batch ----------------------------------------------------------------------------


def run_batch(settings: Settings, *, quiet_unmatched: set[str] | None = None,
              only: set[str] | None = None) -> BatchReport:
    """Process every patient folder in the import dir once (or only the named ones)."""
    report = BatchReport()
    batch_stamp = time.strftime("%Y%m%d_%H%M%S")
    matched, report.unmatched = scan_import_dir(settings)
    for name in report.unmatched:
        if quiet_unmatched is None or name not in quiet_unmatched:
            warn("Pattern does not match: %s (left untouched, not sent)", display(name))
            if quiet_unmatched is not None:
                quiet_unmatched.add(name)
    if only is not None:
        matched = [(name, patient) for name, patient in matched if name in only]

    with contextlib.ExitStack() as locks:
        if not settings.log_patient_names:
            locks.enter_context(logs.hidden_names(patient.name for _, patient in matched))
        folders: list[Folder] = []
        recovered: list[str] = []  # sources an interrupted archive step has now moved
        if not settings.dry_run:
            _recover_elsewhere(settings, {name for name, _ in matched}, recovered)
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
            if files:
                folders.append(folder)
        report.folders = folders
        if not folders:
            return report

        dumps = _validate(folders)
        _check_patients(folders, dumps, settings)
        if settings.dry_run:
            _describe(folders, dumps, settings)
            return report
        for folder in folders:
            _remember_held(settings, folder)

        journal = Journal(settings.state_dir)
        journal.forget(recovered)
        try:
            with Sender(settings, journal) as sender:
                for folder in folders:
                    if folder.held:
                        continue
                    try:
                        _stamp(folder, dumps, settings)
                    except dcmtk.Stopped:
                        break  # shutting down: archive what was delivered, leave the rest
                    sender.submit(folder)
            for folder in folders:
                _finish(folder, settings, journal, sender.verifier, batch_stamp)
        finally:
            journal.close()
    return report


def _validate(folders: list[Folder]) -> dict[str, dcmtk.Dump]:
    """[PHASE 1.5]: DICM magic for all files, then one full read of every DICOM file."""
    all_files = [f.path for folder in folders for f in folder.files]
    event("PHASE 1.5", "Validating %d files in %d folders", len(all_files), len(folders))
    magic = dcmtk.dicom_magic(all_files)
    dicom = [path for path in all_files if magic[path]]
    dumps = dcmtk.dump_tags(dicom, ORIGINAL_TAGS)
    for folder in folders:
        candidates = []
        for source in folder.files:
            dump = dumps.get(source.path)
            if dump is None:
                warn("Not a DICOM file: %s/%s (archived with its folder, not sent)",
                     display(folder.name), display(source.rel))
                folder.unsent.append(source)
            elif dump.error:
                folder.to_quarantine[source.path] = f"DCMTK cannot read this file: {dump.error}"
            elif (dump.values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS) == DICOMDIR_SOP_CLASS
                  or os.path.basename(source.path).upper() == "DICOMDIR"):
                folder.unsent.append(source)  # a CD's index, not an image: never sent
            else:
                source.transfer_syntax = dump.values.get(dcmtk.TRANSFER_SYNTAX, "")
                source.sop_uid = dump.values.get(dcmtk.SOP_INSTANCE_UID, "")
                source.study_uid = dump.values.get(dcmtk.STUDY_INSTANCE_UID, "")
                candidates.append(source)
        folder.files = candidates
    return dumps


def _check_patients(folders: list[Folder], dumps: dict[str, dcmtk.Dump],
                    settings: Settings) -> None:
    """Two people in one folder (two CDs copied together) must never be merged."""
    for folder in folders:
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
    note = settings.state_dir / "held" / f"{_folder_hash(folder.name)}.txt"
    if folder.held:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(f"{folder.name}\n{folder.held}\n", encoding="utf-8",
                        errors="surrogateescape")
    else:
        note.unlink(missing_ok=True)


def _describe(folders: list[Folder], dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    targets = ", ".join(d.label for d in settings.destinations)
    for folder in folders:
        event("DRY-RUN", "%s: would stamp %d files as %s and send them to %s; "
              "%d not DICOM (archive unsent); %d unreadable (quarantine)%s",
              display(folder.name), len(folder.files), _identity(folder.patient, settings),
              targets, len(folder.unsent), len(folder.to_quarantine),
              f"; HELD: {folder.held}" if folder.held else "")


def _identity(patient: Patient, settings: Settings) -> str:
    name = patient.name if settings.log_patient_names else "***"
    return f"ID {patient.id} / name {name}"


# --- [PHASE 1] stamp and verify --------------------------------------------------------------


def _stamp(folder: Folder, dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Give every file its folder's identity through a verified copy, then swap it in."""
    patient = folder.patient
    utf8 = not patient.is_ascii()
    to_stamp: list[SourceFile] = []
    for source in folder.files:
        values = dumps[source.path].values
        if (values.get(dcmtk.PATIENT_ID) == patient.id
                and values.get(dcmtk.PATIENT_NAME) == patient.name
                and (not utf8 or values.get(dcmtk.CHARSET) == "ISO_IR 192")):
            folder.ready.append(source)  # already stamped by an earlier run
        else:
            to_stamp.append(source)
    event("PHASE 1", "%s: stamping %d files with %s (%d already carry it)",
          display(folder.name), len(to_stamp), _identity(patient, settings), len(folder.ready))
    if not to_stamp:
        return

    # Most files are stamped in place by dcmodify's backup mode (the original is renamed to
    # <file>.bak before the new file is written); files that need a character-set
    # conversion, or already have a <file>.bak beside them, go through working copies.
    in_place, via_copy = [], []
    for source in to_stamp:
        charset = dumps[source.path].values.get(dcmtk.CHARSET, "")
        plain = not utf8 or charset in UTF8_CHARSETS
        (in_place if plain and not os.path.lexists(source.path + ".bak") else via_copy).append(
            source)
    if in_place:
        _stamp_in_place(folder, in_place, settings, utf8)
    if via_copy:
        _stamp_copies(folder, via_copy, dumps, settings, utf8)


def _stamp_in_place(folder: Folder, files: list[SourceFile], settings: Settings,
                    utf8: bool) -> None:
    """dcmodify with backups, verified; a file that fails gets its original back.

    An intent file in STATE_DIR lists the files under way, so that after a crash at any
    point the next run puts every <file>.bak back before it looks at the folder.
    """
    intent = _intent_path(settings, folder.name)
    _write_intent(intent, [f.path for f in files])
    try:
        by_path = {f.path: f for f in files}
        runs = dcmtk.stamp_identity(list(by_path), folder.patient, utf8=utf8, backup=True)
        for path, problem in _verify(folder, by_path, runs, utf8).items():
            backup = path + ".bak"
            if problem is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)
                _mark_ready(folder, by_path[path])
                continue
            if os.path.lexists(backup):
                os.replace(backup, path)  # the original, untouched
            folder.to_quarantine[path] = problem
    finally:
        _recover_interrupted_stamp(settings, folder.name)


def _stamp_copies(folder: Folder, files: list[SourceFile], dumps: dict[str, dcmtk.Dump],
                  settings: Settings, utf8: bool) -> None:
    """Stamp working copies (dcmodify -nb), verify them, then swap each in atomically."""
    work = settings.import_dir / WORK_DIR_NAME / _folder_hash(folder.name)
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a crashed run: copies only
    work.mkdir(parents=True)
    try:
        copies = _stage_copies(folder, files, dumps, work, utf8)
        runs = dcmtk.stamp_identity(list(copies), folder.patient, utf8=utf8, backup=False)
        for copy, problem in _verify(folder, copies, runs, utf8).items():
            source = copies[copy]
            if problem:
                folder.to_quarantine[source.path] = problem
                continue
            try:
                _replace(copy, source.path)
            except OSError as exc:
                folder.pending[source.path] = f"cannot replace with stamped copy: {exc.strerror}"
                continue
            _mark_ready(folder, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when no other importer is using it
            work.parent.rmdir()


def _verify(folder: Folder, stamped: Iterable[str], runs: list[dcmtk.ToolRun],
            utf8: bool) -> dict[str, str | None]:
    """Read every stamped file back (exit codes and messages cannot be trusted, see
    DESIGN.md). Returns path -> problem (None: the file carries the identity)."""
    messages = [line for run in runs for line in run.lines if line.startswith("E: ")]
    stamped = list(stamped)
    checked = dcmtk.dump_tags(stamped, (dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME,
                                               dcmtk.CHARSET))
    problems: dict[str, str | None] = {}
    for path in stamped:
        problem = _identity_problem(checked[path], folder.patient, utf8)
        if problem:
            said = [m for m in messages if path in m]
            problem = (f"the identity could not be written ({problem})"
                       + (f"; dcmodify said: {' | '.join(said)}" if said else ""))
        problems[path] = problem
    return problems


def _mark_ready(folder: Folder, source: SourceFile) -> None:
    try:
        st = os.lstat(source.path)
    except OSError as exc:
        folder.pending[source.path] = f"stamped file vanished: {exc.strerror}"
        return
    source.size, source.mtime_ns = st.st_size, st.st_mtime_ns
    folder.ready.append(source)


def _recover(settings: Settings, folder_name: str, recovered: list[str]) -> None:
    """Finish what a crashed run left half done in this folder, before looking at it."""
    if restored := _recover_interrupted_stamp(settings, folder_name):
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
    return settings.state_dir / "archiving" / f"{_folder_hash(folder_name)}.json"


def _intent_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "stamping" / f"{_folder_hash(folder_name)}.paths"


def _write_intent(intent: Path, paths: list[str]) -> None:
    intent.parent.mkdir(parents=True, exist_ok=True)
    with open(intent, "wb") as fh:
        fh.write(b"\0".join(os.fsencode(p) for p in paths))
        fh.flush()
        os.fsync(fh.fileno())


def _recover_interrupted_stamp(settings: Settings, folder_name: str) -> int:
    """Put back every <file>.bak a stamping of this folder left; return how many."""
    intent = _intent_path(settings, folder_name)
    try:
        listed = intent.read_bytes()
    except FileNotFoundError:
        return 0
    restored = 0
    for raw in filter(None, listed.split(b"\0")):
        path = os.fsdecode(raw)
        if os.path.lexists(path + ".bak"):
            os.replace(path + ".bak", path)
            restored += 1
    intent.unlink()
    return restored


def _stage_copies(folder: Folder, to_stamp: list[SourceFile], dumps: dict[str, dcmtk.Dump],
                  work: Path, utf8: bool) -> dict[str, SourceFile]:
    """Copies to stamp (dcmodify -nb rewrites in place; the original must survive a crash).

    For a non-ASCII name, a file in another character set becomes UTF-8 first (dcmconv +U8,
    in parallel); one labelled with a term DCMTK does not know (RELABEL_CHARSETS) is
    relabelled on a copy first. A file that cannot be converted is quarantined, never sent.
    """
    copies: dict[str, SourceFile] = {}
    conversions: list[tuple[SourceFile, str, str, str]] = []  # source, dcmconv input, copy, set
    to_relabel: dict[str, list[str]] = {}  # standard term -> copies to relabel with it
    for index, source in enumerate(to_stamp):
        copy = str(work / f"{index}.dcm")
        charset = dumps[source.path].values.get(dcmtk.CHARSET, "")
        if not utf8 or charset in UTF8_CHARSETS:
            target = copy  # stamped as it is
        elif charset in RELABEL_CHARSETS:
            target = str(work / f"{index}.relabelled.dcm")
        else:
            conversions.append((source, source.path, copy, charset))
            continue
        try:
            shutil.copyfile(source.path, target)
        except OSError as exc:
            folder.pending[source.path] = f"cannot make a working copy: {exc.strerror}"
            continue
        if target == copy:
            copies[copy] = source
        else:
            to_relabel.setdefault(RELABEL_CHARSETS[charset], []).append(target)
            conversions.append((source, target, copy, charset))
    for standard, paths in to_relabel.items():
        dcmtk.set_charset(paths, standard)  # the conversion below is the verdict
    if not conversions:
        return copies
    converted: dict[str, SourceFile] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = pool.map(lambda c: dcmtk.convert_to_utf8(c[1], c[2]), conversions)
        for (source, given, copy, charset), run in zip(conversions, runs, strict=True):
            if given != source.path:
                with contextlib.suppress(OSError):
                    os.unlink(given)
            if run.exit_code == 0 and os.path.exists(copy):
                converted[copy] = source
                continue
            said = " | ".join(line for line in run.lines if line[:3] in ("E: ", "F: "))
            why = (f"cannot convert character set {charset!r} to UTF-8 for the non-ASCII "
                   f"name (dcmconv +U8 exit {run.exit_code}: {said})")
            if given != source.path:
                why += (f"; DICOM has no {charset!r} (Korean is only defined as a code "
                        f"extension), so it was tried as {RELABEL_CHARSETS[charset]!r}: typically "
                        "its Korean text is plain EUC-KR without the ESC $ ) C escape sequence "
                        "DICOM requires before Korean in each value and name component. Fix "
                        "the file at its source, or import it under an ASCII folder name "
                        "(then its text is sent as it is, in its own character set)")
            folder.to_quarantine[source.path] = why
    # Not the exit code's word: the stamp adds ISO_IR 192 anyway, so check it is dcmconv's.
    for copy, dump in dcmtk.dump_tags(list(converted), (dcmtk.CHARSET,)).items():
        if dump.error or dump.values.get(dcmtk.CHARSET) != "ISO_IR 192":
            folder.to_quarantine[converted[copy].path] = (
                "dcmconv +U8 did not leave a UTF-8 file: "
                + (dump.error or f"SpecificCharacterSet is {dump.values.get(dcmtk.CHARSET)!r}"))
        else:
            copies[copy] = converted[copy]
    return copies


def _identity_problem(dump: dcmtk.Dump, patient: Patient, utf8: bool) -> str | None:
    if dump.error:
        return f"unreadable after stamping: {dump.error}"
    values = dump.values
    if values.get(dcmtk.PATIENT_ID) != patient.id:
        return f"PatientID is {values.get(dcmtk.PATIENT_ID)!r}"
    if values.get(dcmtk.PATIENT_NAME) != patient.name:
        if logs.hiding_names():
            return "PatientName is not the folder's (value not shown: LOG_PATIENT_NAMES=false)"
        return f"PatientName is {values.get(dcmtk.PATIENT_NAME)!r}"
    if utf8 and values.get(dcmtk.CHARSET) != "ISO_IR 192":
        return f"SpecificCharacterSet is {values.get(dcmtk.CHARSET)!r}, not ISO_IR 192"
    return None


def _replace(copy: str, original: str) -> None:
    """Atomically put the stamped copy in place of the original."""
    try:
        os.replace(copy, original)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        sibling = os.path.join(os.path.dirname(original), ".importer-" + os.path.basename(original))
        shutil.copyfile(copy, sibling)
        os.replace(sibling, original)


# --- [PHASE 2] send ---------------------------------------------------------------------------


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
                groups = _split(todo, destination)
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
        recorder = _AnswerRecorder(self.journal, destination.name, by_path)
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


class _AnswerRecorder:
    """Writes the PACS's answers to the journal while storescu is still running (at most
    every 0.1 s: a few commits a second), so a crash mid-send resends only about the last
    0.1 s of answers (and whatever an orphaned storescu sends after its parent died)."""

    def __init__(self, journal: Journal, destination: str, files: dict[str, SourceFile]) -> None:
        self.journal = journal
        self.destination = destination
        self.files = files
        self.recorded: set[str] = set()
        self.buffer: list[tuple[FileKey, bool, bool, str]] = []
        self.last_flush = time.monotonic()

    def add(self, path: str, result: dcmtk.StoreResult) -> None:
        source = self.files.get(path)
        if source is None or path in self.recorded:
            return
        self.recorded.add(path)
        self.buffer.append((source.key, result.outcome is dcmtk.Outcome.DELIVERED,
                            result.outcome is dcmtk.Outcome.PERMANENT, result.detail))
        if time.monotonic() - self.last_flush > 0.1:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.journal.record(self.destination, self.buffer)
            self.buffer = []
        self.last_flush = time.monotonic()


def _split(files: list[SourceFile],
           destination: Destination) -> list[tuple[str, list[SourceFile]]]:
    """Associations to open: per transfer syntax (storescu proposes compressed syntaxes only
    when told), each split over up to `associations` parallel associations."""
    by_syntax: dict[str, list[SourceFile]] = {}
    for source in files:
        by_syntax.setdefault(dcmtk.proposal_for(source.transfer_syntax), []).append(source)
    groups = []
    for syntax, same in by_syntax.items():
        count = max(1, min(destination.associations,
                           math.ceil(len(same) / MIN_FILES_PER_ASSOCIATION)))
        size = math.ceil(len(same) / count)
        groups += [(syntax, same[i:i + size]) for i in range(0, len(same), size)]
    return groups


# --- [PHASE 3] archive, quarantine, report -------------------------------------------------------


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
                or source.path in folder.pending):
            folder.pending[source.path] = "not processed in this run"

    # Loose ends of a folder (not-DICOM files, a DICOMDIR) go once its images are done.
    if not folder.pending:
        to_archive += folder.unsent
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
    by_path = {f.path: f for f in folder.files + folder.unsent}
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
    outcome = Outcome()
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
    folder.archived = len(archived) - folder.quarantined
    if outcome.receipt_error:
        error("%s: the receipt %s could not be written: %s", display(folder.name),
              display(plan.receipt_path or ""), outcome.receipt_error)
    journal.forget(archived)
    remove_empty_dirs(folder.path)
    for path, why in folder.pending.items():
        warn("%s: left for retry: %s", display(os.path.relpath(path, settings.import_dir)), why)
    event("INFO", "%s: %d sent, %d not DICOM (archived unsent), %d quarantined,"
          " %d left for retry, %d left in place, %.2f s",
          display(folder.name), folder.sent, len(folder.unsent) if not folder.pending else 0,
          folder.quarantined, len(folder.pending), len(folder.left),
          time.monotonic() - folder.started)
