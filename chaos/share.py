"""The share: writes a scenario's folders as people and `smbd` do, and records the ground truth.

Every complete version of every file the share ever held is recorded (`Truth`) before it is
written: the oracle knows what was there whatever the importer did with it. Source files are
made in a staging directory on the same filesystem, then copied in (or renamed in, for a
replacement: a new inode), so what the importer sees is only ever a copy under way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from chaos.scenario import Folder, Scenario
from simsite.dicomgen import make_ct, truncated_copy
from simsite.writers import Writer

SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@dataclass(frozen=True)
class Version:
    """One complete (or, for `truncated`, deliberately incomplete) version of one source file."""

    sha256: str
    sop_uid: str = ""  # "" for a file that is not DICOM
    pixels: str = ""  # sha256 of its PixelData, "" without
    instance: int = 0
    compressed: bool = False
    complete: bool = True
    study_uid: str = ""

    @property
    def dicom(self) -> bool:
        return bool(self.sop_uid)


@dataclass
class Truth:
    """What the share held: (folder index, relative path) -> versions in the order written."""

    scenario: Scenario
    versions: dict[tuple[int, str], list[Version]] = field(default_factory=dict)
    names: dict[int, list[str]] = field(default_factory=dict)  # every name a folder had
    deleted: set[int] = field(default_factory=set)
    preloaded: set[str] = field(default_factory=set)  # UIDs a PACS held before the scenario
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: list[str] = field(default_factory=list)  # what the share did, when (wall clock)

    def did(self, what: str) -> None:
        with self.lock:
            self.done.append(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}"
                             f" {what}")

    def stays(self, index: int) -> bool:
        """May this folder's files stay in the import dir once all is quiet? A held folder or
        a refused name; a folder renamed, or whose study a required PACS filed under another
        PatientID (the next run finds the study there under another ID and holds the rest),
        or that shares a study with another patient's folder (the importer remembers whose
        each study is: the second one is held)."""
        folder = self.scenario.folders[index]
        if folder.held or not folder.matched or len(self.names.get(index, ())) > 1:
            return True  # (renamed after images went under the old ID: held, a person decides)
        refiled = {n for d in self.scenario.destinations if d.required for n in d.refile}
        with self.lock:
            mine = [v for (i, _), vs in self.versions.items() if i == index for v in vs]
            studies = {v.study_uid for v in mine if v.study_uid}
            shared = any(v.study_uid in studies and self._patient(i) != self._patient(index)
                         for (i, _), vs in self.versions.items() if i != index for v in vs)
            return shared or any(v.instance in refiled for v in mine)

    def _patient(self, index: int) -> str:
        """The PatientID the folder's (first) name gives."""
        return self.names[index][0][1:].partition("-")[0] if self.names.get(index) else ""

    def record(self, index: int, rel: str, version: Version) -> None:
        with self.lock:
            self.versions.setdefault((index, rel), []).append(version)


def signature(path: Path) -> Version:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        ds = pydicom.dcmread(path, force=False)
        uid = str(ds.SOPInstanceUID)
    except Exception:  # not DICOM (or not readable as such): bytes are its identity
        return Version(digest)
    pixels = hashlib.sha256(ds.PixelData).hexdigest() if "PixelData" in ds else ""
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    return Version(digest, uid, pixels, int(ds.get("InstanceNumber", 0) or 0), compressed,
                   study_uid=str(ds.get("StudyInstanceUID", "")))


class Share:
    """The import dir as people fill it: one scenario's folders, their writers and accidents."""

    def __init__(self, truth: Truth, import_dir: Path, staging: Path) -> None:
        self.truth = truth
        self.import_dir = import_dir
        self.staging = staging
        self.stalled: dict[tuple[int, str], Writer] = {}
        self.writer_failures: list[str] = []  # a writer whose file was taken from under it
        self.versions: dict[tuple[int, str], Version] = {}  # each staged file's version
        self.written: set[tuple[int, str]] = set()  # files their first writer has finished
        self._count = 0

    def current(self, index: int) -> Path:
        return self.import_dir / self.truth.names[index][-1]

    def stage(self, index: int, folder: Folder) -> dict[str, Path]:
        """Make every source file of a folder in the staging dir; record its truth."""
        self.truth.names[index] = [folder.name]
        staged = {}
        for spec in folder.files:
            src = self.staging / str(index) / spec.rel
            src.parent.mkdir(parents=True, exist_ok=True)
            if spec.source == "ct" or spec.source == "truncated":
                make_ct(src, patient_id=f"OLD{index}", patient_name=f"Old^Name{index}",
                        rows=spec.rows, study_uid=folder.study_uid,
                        series_uid=folder.study_uid + ".1", sop_uid=spec.sop_uid,
                        birth_date=spec.birth_date or None, sex=spec.sex or None,
                        instance_number=spec.instance)
                if spec.source == "truncated":
                    whole = src.with_suffix(".whole")
                    src.rename(whole)
                    truncated_copy(whole, src, whole.stat().st_size // 2)
            elif spec.source.startswith("sample:"):
                shutil.copyfile(SAMPLES / spec.source.split(":", 1)[1], src)
            elif spec.source == "pdf":
                src.write_bytes(PDF)
            else:
                src.write_text("Ward 3: left knee, please compare with last year's\n")
            version = signature(src)
            if spec.source == "truncated":
                version = Version(version.sha256, spec.sop_uid, complete=False)
            self.versions[(index, spec.rel)] = version  # recorded as it is written
            staged[spec.rel] = src
        return staged

    def arrive(self, index: int, folder: Folder, staged: dict[str, Path],
               stall: tuple[str, bool] | None, pace: float) -> None:
        """Copy the folder in, file by file (`pace` seconds apart); one may stall midway."""
        target = self.current(index)
        for rel, src in staged.items():
            dst = target / rel
            self.truth.record(index, rel, self.versions[(index, rel)])
            if stall is not None and rel == stall[0]:
                self.stalled[(index, rel)] = Writer(
                    src, dst, max(1, src.stat().st_size // 3), close_between=stall[1],
                    control_dir=self.staging)
                continue
            _copy(src, dst)
            self.written.add((index, rel))
            self.truth.did(f"wrote {dst}")
            time.sleep(pace)

    def release(self, index: int, rel: str) -> None:
        writer = self.stalled.pop((index, rel), None)
        if writer is None:
            return
        writer.go.touch()
        if writer.process.wait(timeout=30) != 0:
            self.writer_failures.append(f"{self.truth.names[index][-1]!r}/{rel}")

    def replace(self, index: int, rel: str, new_version: bool) -> bool:
        """Write the file again under a temporary name and rename it over the old one."""
        deadline = time.monotonic() + 20
        while (index, rel) not in self.written and time.monotonic() < deadline:
            time.sleep(0.05)  # a replacement comes after the first copy, not during it
        if index in self.truth.deleted or (index, rel) not in self.written:
            return False
        src = self.staging / str(index) / rel
        fresh = self.staging / f"replace-{self._next()}"
        shutil.copyfile(src, fresh)
        if new_version:  # the same image exported again: same UID, other content
            ds = pydicom.dcmread(fresh)
            make_ct(fresh, patient_id=str(ds.PatientID), patient_name=str(ds.PatientName),
                    rows=int(ds.Rows) * 2, study_uid=str(ds.StudyInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
                    birth_date=ds.get("PatientBirthDate"), sex=ds.get("PatientSex"),
                    instance_number=int(ds.InstanceNumber))
        self.truth.record(index, rel, signature(fresh))
        dst = self.current(index) / rel
        existed = dst.exists()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fresh, dst)
        self.truth.did(f"replaced {dst} (new version: {new_version}; was there: {existed})")
        return True

    def add(self, index: int, folder: Folder, count: int, uid: str) -> bool:
        if index in self.truth.deleted:
            return False
        target = self.current(index)
        for k in range(count):
            rel = f"added/IM{self._next():05d}.dcm"
            src = self.staging / str(index) / rel
            make_ct(src, patient_id=f"OLD{index}", patient_name=f"Old^Name{index}",
                    rows=16, study_uid=folder.study_uid, series_uid=folder.study_uid + ".2",
                    sop_uid=f"{uid}.{k}", instance_number=100 + k,
                    birth_date=folder.files[0].birth_date or None,
                    sex=folder.files[0].sex or None)
            self.truth.record(index, rel, signature(src))
            _copy(src, target / rel)
            self.truth.did(f"added {target / rel}")
        return True

    def delete(self, index: int) -> None:
        with self.truth.lock:
            self.truth.deleted.add(index)
        shutil.rmtree(self.current(index), ignore_errors=True)

    def rename(self, index: int, new_name: str) -> bool:
        if index in self.truth.deleted or not self.current(index).exists():
            return False
        with self.truth.lock:
            old = self.current(index)
            self.truth.names[index].append(new_name)
        try:
            os.rename(old, self.current(index))
        except OSError:  # the importer moved it away a moment ago: nothing to rename
            with self.truth.lock:
                self.truth.names[index].pop()
            return False
        return True

    def _next(self) -> int:
        self._count += 1
        return self._count


def _copy(src: Path, dst: Path) -> None:
    """Copy as smbd does: create, write, close (no rename: the importer sees it grow)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)
