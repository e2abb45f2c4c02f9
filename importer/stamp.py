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
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from importer import dcmtk, logs, progress
from importer.charsets import UTF8_CHARSETS, has_un, stage_copies
from importer.config import Settings
from importer.folders import Patient, display
from importer.intent import intent_path, recover_interrupted_stamp, write_intent
from importer.logs import event
from importer.model import Folder, SourceFile, folder_hash, identity_label
from importer.provenance import by_provenance
from importer.share import Identity, changed_since, identity

WORK_DIR_NAME = ".importer-work"
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
        plain = (not utf8 or charset in UTF8_CHARSETS) and not has_un(dumps[source.path])
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
        write_intent(intent_path(settings, folder.name), [f.path for f in files])
    try:
        jobs: list[tuple[int, list[str], Patient, bool, tuple[str, ...]]] = []
        expected: dict[str, int] = {}
        for index, (folder, files, utf8) in enumerate(work):
            groups, items = by_provenance(((f.path, dumps[f.path].values) for f in files),
                                           folder.patient, when)
            expected |= items
            jobs += [(index, paths, folder.patient, utf8, args) for args, paths in groups.items()]
        workers = os.cpu_count() or 2
        if len(jobs) < workers:  # one big folder: its files shared by as many dcmodify
            jobs = [(index, share, patient, utf8, args)  # as there are cores
                    for index, paths, patient, utf8, args in jobs
                    for share in _shares(paths, workers)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(lambda job: _stamp_job(*job[1:]), jobs))
        runs = [job_runs for job_runs, _ in done]
        # What dcmodify left at each path, read as each call ends: a file replaced after
        # this is someone else's newer version.
        stamped_as = {path: ident for _, idents in done for path, ident in idents.items()}
        runs_of: dict[int, list[dcmtk.ToolRun]] = {}
        for job, job_runs in zip(jobs, runs, strict=True):
            runs_of.setdefault(job[0], []).extend(job_runs)
        checked = dcmtk.dump_tags([f.path for _folder, files, _u in work for f in files],
                                  CHECKED_TAGS)
        for index, (folder, files, utf8) in enumerate(work):
            by_path = {f.path: f for f in files}
            for path, problem in _problems(folder, by_path, checked, runs_of.get(index, []),
                                           utf8, expected).items():
                _settle_in_place(folder, by_path[path], problem, stamped_as.get(path),
                                 _not_dcmodifys(checked[path], folder.patient, expected.get(path)))
    finally:
        for folder, _files, _utf8 in work:
            recover_interrupted_stamp(settings, folder.name)


SHARED_FILES = 200  # a dcmodify job of more files than this is shared between the cores


def _shares(paths: list[str], workers: int) -> list[list[str]]:
    """paths in `workers` consecutive shares (or whole, when few)."""
    if len(paths) < SHARED_FILES:
        return [paths]
    size = -(-len(paths) // workers)
    return [paths[start:start + size] for start in range(0, len(paths), size)]


def _stamp_job(paths: list[str], patient: Patient, utf8: bool, provenance: tuple[str, ...]
               ) -> tuple[list[dcmtk.ToolRun], dict[str, Identity | None]]:
    runs = dcmtk.stamp_identity(paths, patient, utf8=utf8, backup=True, provenance=provenance)
    return runs, {path: identity(path) for path in paths}


# dcmodify's words for a file it could not read or write: on a file that validated, the
# host failed (EIO, ENOSPC on its rename or write), not the file (chaos seed 238).
_HOST_FAULTS = ("dcmodify said: E: unable to load file", "dcmodify said: E: unable to save",
                "dcmodify said: E: couldn't save")


def _not_dcmodifys(read_back: dcmtk.Dump, patient: Patient, items: int | None) -> bool:
    """What the read-back found is not what dcmodify wrote: a whole file without the
    folder's identity nor the Original Attributes item dcmodify adds with it (a copy put
    there between dcmodify's write and the look that follows its call: chaos seed 46)."""
    if items is None or read_back.error:
        return False
    values = read_back.values
    return (values.get(dcmtk.PATIENT_ID) != patient.id
            and int(values.get(dcmtk.ORIGINAL_ATTRIBUTES) or 0) != items)


def _settle_in_place(folder: Folder, source: SourceFile, problem: str | None,
                     stamped_as: Identity | None = None, foreign: bool = False) -> None:
    path = source.path
    backup = path + ".bak"
    original = identity(backup)
    if original is not None and not source.ident.same_content(original):
        # A writer was still at it (it writes into the renamed original): what was
        # stamped is a partial copy. The original, with its new bytes, goes back.
        os.replace(backup, path)
        folder.writing[path] = "still being written: it changed while being stamped"
        return
    replaced = stamped_as is not None and not stamped_as.same_content(identity(path))
    if replaced or (foreign and os.path.lexists(backup)
                    and "dcmodify said" not in (problem or "")):
        # Replaced after dcmodify wrote it (a copy again, a new export): the file there is
        # a newer version (or the same bytes again), never to be overwritten by the
        # original it supersedes; it gets its own quiet period. (Putting the backup back
        # here lost it: chaos seed 209.) Told by the timing, or by its content where the
        # timing could not tell: not what dcmodify wrote, and dcmodify said nothing wrong
        # (chaos seeds 46, 128).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backup)
        folder.writing[path] = "still being written: replaced while being stamped"
        return
    if problem is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backup)
        _mark_ready(folder, source)
        return
    if os.path.lexists(backup):
        os.replace(backup, path)  # the original, untouched
    if any(words in problem for words in _HOST_FAULTS) and source.ident.same_content(
            identity(path)):
        # dcmodify could not load or save it (an I/O error, a full disk: the host, not the
        # file, which validated): the original is back as it was; next run, not quarantine.
        folder.pending[path] = f"stamping failed on this host, retried at the next run: {problem}"
        return
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
        copies = stage_copies(folder, files, dumps, work, utf8)
        staged = dcmtk.dump_tags(list(copies), CHECKED_TAGS)
        groups, expected = by_provenance(
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


def _identity_problem(dump: dcmtk.Dump, patient: Patient, utf8: bool) -> str | None:
    if dump.error:
        return f"unreadable after stamping: {dump.error}"
    if has_un(dump):
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
