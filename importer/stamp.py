"""[PHASE 1]: give every file its folder's identity, and prove it before anything is sent.

Most files are stamped in place with dcmodify's backups (the original becomes <file>.bak
before the new file is written), behind an intent file in STATE_DIR so that a crash at any
point costs no original; files that need a character-set conversion go through working
copies. Either way a batched dcmdump reads every stamped file back: DCMTK's exit codes and
messages do not say which files carry the new identity (see DESIGN.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.metadata
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from importer import dcmtk, logs, progress
from importer.config import Settings
from importer.folders import Patient, display
from importer.logs import event
from importer.model import Folder, SourceFile, folder_hash, identity_label
from importer.share import Identity, changed_since, identity

WORK_DIR_NAME = ".importer-work"
UTF8_CHARSETS = ("", "ISO_IR 6", "ISO_IR 192")
# Korean in the wild: (0008,0005) says "ISO_IR 149" (or "ISO 2022 IR 149" as value 1), which
# DCMTK refuses. Both name KS X 1001, which DICOM only defines with code extensions, as
# "\ISO 2022 IR 149". A working copy is relabelled so and converted; dcmconv then accepts
# exactly the text that carries the ESC $ ) C designation DICOM requires before Korean in
# every value/component, and fails loudly (the file is quarantined) on plain EUC-KR.
RELABEL_CHARSETS = {"ISO_IR 149": "\\ISO 2022 IR 149", "ISO 2022 IR 149": "\\ISO 2022 IR 149"}


# The read-back of a stamped file: its identity, and the provenance item it gained.
CHECKED_TAGS = (dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET, dcmtk.ORIGINAL_ATTRIBUTES)


def stamp(folders: list[Folder], dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Give every file of these folders its folder's identity, keeping the original one in
    an Original Attributes Sequence item; the files that carry it become ready.

    One dcmodify per folder and original identity (it cannot be fewer), run in parallel on
    the cores, then one batched dcmdump reads every stamped file of every folder back.
    """
    when = time.strftime("%Y%m%d%H%M%S%z")
    in_place: list[tuple[Folder, list[SourceFile], bool]] = []
    for folder in folders:
        files, via_copy, utf8 = _sort(folder, dumps, settings)
        if via_copy:
            _stamp_copies(folder, via_copy, dumps, settings, utf8, when)
        if files:
            in_place.append((folder, files, utf8))
    if in_place:
        _stamp_in_place(in_place, dumps, settings, when)


def _provenance(values: dict[str, str], patient: Patient,
                when: str) -> tuple[tuple[str, ...], int]:
    """The dcmodify arguments that keep what the stamp changes of this file (its original
    PatientID and PatientName, only those that differ), and the item count the file's
    Original Attributes Sequence must have afterwards (0: nothing to keep)."""
    originals = [(tag, values.get(tag) or "") for tag, new in
                 ((dcmtk.PATIENT_ID, patient.id), (dcmtk.PATIENT_NAME, patient.name))
                 if values.get(tag) != new]
    if not originals:
        return (), 0
    items = int(values.get(dcmtk.ORIGINAL_ATTRIBUTES) or 0)
    return tuple(dcmtk.original_attributes_args(items, originals, when, modifying_system())), \
        items + 1


@functools.cache
def modifying_system() -> str:
    """Modifying System (0400,0563): this program and its version."""
    try:
        return f"dicom-importer {importlib.metadata.version('dicom-importer')}"
    except importlib.metadata.PackageNotFoundError:
        return "dicom-importer"


def _by_provenance(files: Iterable[tuple[str, dict[str, str]]], patient: Patient,
                   when: str) -> tuple[dict[tuple[str, ...], list[str]], dict[str, int]]:
    """Files (path, original values) grouped by the provenance their stamp adds (files with
    the same original identity share one dcmodify), and path -> the item count expected."""
    groups: dict[tuple[str, ...], list[str]] = {}
    expected: dict[str, int] = {}
    for path, values in files:
        args, items = _provenance(values, patient, when)
        groups.setdefault(args, []).append(path)
        if items:
            expected[path] = items
    return groups, expected


def _sort(folder: Folder, dumps: dict[str, dcmtk.Dump],
          settings: Settings) -> tuple[list[SourceFile], list[SourceFile], bool]:
    """Files already stamped become ready; the others go in place, or (a character-set
    conversion, UN tags, a <file>.bak already beside them) through working copies."""
    patient = folder.patient
    utf8 = not patient.is_ascii()
    to_stamp: list[SourceFile] = []
    for source in folder.files:
        if _identity_problem(dumps[source.path], patient, utf8) is None:
            folder.ready.append(source)  # already stamped by an earlier run
        else:
            to_stamp.append(source)
    event("PHASE 1", "%s: stamping %d files with %s (%d already carry it)",
          display(folder.name), len(to_stamp), identity_label(patient, settings), len(folder.ready))
    in_place, via_copy = [], []
    for source in to_stamp:
        charset = dumps[source.path].values.get(dcmtk.CHARSET, "")
        plain = (not utf8 or charset in UTF8_CHARSETS) and not _has_un(dumps[source.path])
        (in_place if plain and not os.path.lexists(source.path + ".bak") else via_copy).append(
            source)
    return in_place, via_copy, utf8


def _stamp_in_place(work: list[tuple[Folder, list[SourceFile], bool]],
                    dumps: dict[str, dcmtk.Dump], settings: Settings, when: str) -> None:
    """dcmodify with backups (the original becomes <file>.bak before the new file is
    written), verified; a file that fails gets its original back.

    An intent file per folder in STATE_DIR lists the files under way, so that after a crash
    at any point the next run puts every <file>.bak back before it looks at the folder.
    """
    for folder, files, _utf8 in work:
        _write_intent(_intent_path(settings, folder.name), [f.path for f in files])
    try:
        jobs: list[tuple[int, list[str], Patient, bool, tuple[str, ...]]] = []
        expected: dict[str, int] = {}
        for index, (folder, files, utf8) in enumerate(work):
            groups, items = _by_provenance(((f.path, dumps[f.path].values) for f in files),
                                           folder.patient, when)
            expected |= items
            jobs += [(index, paths, folder.patient, utf8, args) for args, paths in groups.items()]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            runs = list(pool.map(
                lambda job: dcmtk.stamp_identity(job[1], job[2], utf8=job[3], backup=True,
                                                 provenance=job[4]), jobs))
        runs_of: dict[int, list[dcmtk.ToolRun]] = {}
        for job, job_runs in zip(jobs, runs, strict=True):
            runs_of.setdefault(job[0], []).extend(job_runs)
        checked = dcmtk.dump_tags([f.path for _folder, files, _u in work for f in files],
                                  CHECKED_TAGS)
        for index, (folder, files, utf8) in enumerate(work):
            by_path = {f.path: f for f in files}
            for path, problem in _problems(folder, by_path, checked, runs_of.get(index, []),
                                           utf8, expected).items():
                _settle_in_place(folder, by_path[path], problem)
    finally:
        for folder, _files, _utf8 in work:
            recover_interrupted_stamp(settings, folder.name)


def _settle_in_place(folder: Folder, source: SourceFile, problem: str | None) -> None:
    path = source.path
    backup = path + ".bak"
    original = identity(backup)
    if original is not None and not source.ident.same_content(original):
        # A writer was still at it (it writes into the renamed original): what was
        # stamped is a partial copy. The original, with its new bytes, goes back.
        os.replace(backup, path)
        folder.writing[path] = "still being written: it changed while being stamped"
        return
    if problem is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backup)
        _mark_ready(folder, source)
        return
    if os.path.lexists(backup):
        os.replace(backup, path)  # the original, untouched
    folder.to_quarantine[path] = problem


def _stamp_copies(folder: Folder, files: list[SourceFile], dumps: dict[str, dcmtk.Dump],
                  settings: Settings, utf8: bool, when: str) -> None:
    """Stamp working copies (dcmodify -nb), verify them, then swap each in atomically.

    The originals kept in the provenance are read from the copies: after a conversion to
    UTF-8 (or from UN to real VRs) they must be in the encoding the file now declares."""
    work = settings.import_dir / WORK_DIR_NAME / folder_hash(folder.name)
    shutil.rmtree(work, ignore_errors=True)  # leftovers of a crashed run: copies only
    work.mkdir(parents=True)
    try:
        copies = _stage_copies(folder, files, dumps, work, utf8)
        staged = dcmtk.dump_tags(list(copies), CHECKED_TAGS)
        groups, expected = _by_provenance(
            ((copy, (staged[copy] if not staged[copy].error
                     else dumps[source.path]).values) for copy, source in copies.items()),
            folder.patient, when)
        runs = [run for args, paths in groups.items()
                for run in dcmtk.stamp_identity(paths, folder.patient, utf8=utf8,
                                                backup=False, provenance=args)]
        for copy, problem in _verify(folder, copies, runs, utf8, expected).items():
            source = copies[copy]
            if problem:
                folder.to_quarantine[source.path] = problem
                continue
            if why := changed_since(source.path, source.ident):
                folder.writing[source.path] = f"still being written: {why} while being stamped"
                continue  # the original stays as it is now; the stale copy is dropped
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
            utf8: bool, expected: dict[str, int]) -> dict[str, str | None]:
    """Read every stamped file back (exit codes and messages cannot be trusted, see
    DESIGN.md). Returns path -> problem (None: the file carries the identity)."""
    stamped = list(stamped)
    checked = dcmtk.dump_tags(stamped, CHECKED_TAGS)
    return _problems(folder, stamped, checked, runs, utf8, expected)


def _problems(folder: Folder, stamped: Iterable[str], checked: dict[str, dcmtk.Dump],
              runs: list[dcmtk.ToolRun], utf8: bool,
              expected: dict[str, int]) -> dict[str, str | None]:
    """path -> why the stamped file does not carry the folder's identity, or lacks the
    provenance item it was given (None: all is there)."""
    messages = [line for run in runs for line in run.lines if line.startswith("E: ")]
    problems: dict[str, str | None] = {}
    for path in stamped:
        problem = _identity_problem(checked[path], folder.patient, utf8)
        items = checked[path].values.get(dcmtk.ORIGINAL_ATTRIBUTES) or "0"
        if problem is None and path in expected and int(items) != expected[path]:
            problem = (f"its original identity was not kept (Original Attributes Sequence"
                       f" has {items} items, not {expected[path]})")
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
    source.ident = Identity.of(st)
    folder.ready.append(source)
    progress.add(folder.name, "stamped")


def _intent_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "stamping" / f"{folder_hash(folder_name)}.paths"


def _write_intent(intent: Path, paths: list[str]) -> None:
    intent.parent.mkdir(parents=True, exist_ok=True)
    with open(intent, "wb") as fh:
        fh.write(b"\0".join(os.fsencode(p) for p in paths))
        fh.flush()
        os.fsync(fh.fileno())


def recover_interrupted_stamp(settings: Settings, folder_name: str) -> int:
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
        if _has_un(dumps[source.path]):
            run = dcmtk.convert_un(source.path, copy)  # then stamped as it is
            if run.exit_code == 0 and os.path.exists(copy):
                copies[copy] = source
            else:
                folder.to_quarantine[source.path] = (
                    f"its patient tags are encoded as UN and dcmconv +uc could not give them"
                    f" their real VR (exit {run.exit_code}: {run.said()})")
            continue
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
            why = (f"cannot convert character set {charset!r} to UTF-8 for the non-ASCII "
                   f"name (dcmconv +U8 exit {run.exit_code}: {run.said()})")
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


def _has_un(dump: dcmtk.Dump) -> bool:
    """Identity or character set encoded as UN (explicit VR, as some anonymisers write)."""
    return not dump.un_tags.isdisjoint((dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET))


def _identity_problem(dump: dcmtk.Dump, patient: Patient, utf8: bool) -> str | None:
    if dump.error:
        return f"unreadable after stamping: {dump.error}"
    if _has_un(dump):
        return "its patient tags are encoded as UN"
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
