"""What a batch works on: the files of a patient folder and what became of each."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.config import Settings
from importer.folders import Patient
from importer.journal import FileKey
from importer.logs import MASK
from importer.share import Identity


@dataclass(slots=True)
class SourceFile:
    path: str  # absolute; undecodable bytes kept as surrogate escapes
    rel: str
    ident: Identity  # as read (or, once stamped, as stamped): checked before each last step
    transfer_syntax: str = ""  # from the first full read; stamping keeps it
    sop_uid: str = ""  # for C-FIND verification and the receipt
    sop_class: str = ""  # whether storescu must be told to propose it (-R)
    study_uid: str = ""
    _key: FileKey | None = field(default=None, repr=False, compare=False)  # see key

    @property
    def size(self) -> int:
        return self.ident.size

    @property
    def mtime_ns(self) -> int:
        return self.ident.mtime_ns

    @property
    def key(self) -> FileKey:
        """The journal's key of this version of the file (made once per version: looked up
        several times per file and destination)."""
        key = self._key
        ident = self.ident
        if (key is None or key.size != ident.size or key.mtime_ns != ident.mtime_ns
                or key.ctime_ns != ident.ctime_ns):
            key = self._key = FileKey.of(self.path, ident)
        return key


@dataclass
class Folder:
    name: str
    path: Path
    patient: Patient
    files: list[SourceFile]
    left: list[tuple[str, str]] = field(default_factory=list)  # (rel, why), stays in place
    unsent: list[SourceFile] = field(default_factory=list)  # not DICOM / DICOMDIR: archived
    unsent_kinds: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> sniff kind
    to_quarantine: dict[str, str] = field(default_factory=dict)  # path -> reason
    ready: list[SourceFile] = field(default_factory=list)  # verified identity, sendable
    pending: dict[str, str] = field(default_factory=dict)  # path -> why it waits for retry
    writing: dict[str, str] = field(default_factory=dict)  # path -> why it is not settled yet
    duplicates: dict[str, str] = field(default_factory=dict)  # path -> same UID as which file
    # Files unpacked from an archive of the folder (unpack.py): path -> where they came from
    # ({"archive": rel, "member": path in it}, "inner_archive" for one level deeper).
    members: dict[str, dict[str, str]] = field(default_factory=dict)
    held: str | None = None
    reconciliation: dict[str, Any] | None = None  # what the site knows (reconcile.py)
    released: dict[str, Any] | None = None  # a person's release of a hold (release.py)
    sent: int = 0
    quarantined: int = 0
    started: float = field(default_factory=time.monotonic)

    def forget_files(self) -> None:
        """Once finished, a folder keeps only what the batch's report needs (what waits,
        why, what was held): memory stays flat in the number of folders of a batch."""
        self.files, self.ready, self.unsent, self.duplicates = [], [], [], {}
        self.unsent_kinds, self.members = {}, {}


def folder_hash(name: str) -> str:
    """A folder's name as a file name (locks, intents, plans): fixed length, any bytes."""
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def identity_label(patient: Patient, settings: Settings) -> str:
    """The identity as logs may show it (the name masked under LOG_PATIENT_NAMES=false)."""
    name = patient.name if settings.log_patient_names else MASK
    return f"ID {patient.id} / name {name}"
