"""Proof of delivery: ask each PACS back (C-FIND) before a file is archived.

A C-STORE success says the PACS took the bytes; it does not say the PACS kept them, or
filed them under the right patient. One `findscu` per study lists what the PACS holds;
an instance counts as verified only when it is listed under the folder's PatientID.
Where a PACS answers no C-FIND (`verify = auto`), that is said once and the C-STORE
answers are relied on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from importer import dcmtk
from importer.config import Destination, Settings
from importer.journal import FileKey, Journal
from importer.logs import warn


class Instance(Protocol):
    path: str
    sop_uid: str
    study_uid: str

    @property
    def key(self) -> FileKey: ...


class Verifier:
    def __init__(self, settings: Settings, journal: Journal) -> None:
        self.settings = settings
        self.journal = journal
        self.unsupported: set[str] = set()  # destinations (auto) that answer no C-FIND
        self.lock = threading.Lock()

    def applies(self, destination: Destination) -> bool:
        """Whether files must be verified at this destination before they are archived."""
        return destination.verify != "none" and destination.name not in self.unsupported

    def verify(self, destination: Destination, patient_id: str,
               files: Iterable[Instance]) -> dict[str, str]:
        """Query until every file is listed (or attempts run out); record the verdicts.

        Returns path -> reason for files the PACS filed under another PatientID: those
        must never be archived silently.
        """
        waiting = {f.sop_uid: f for f in files if f.sop_uid}
        wrong: dict[str, str] = {}
        for attempt in range(self.settings.verify_attempts):
            if attempt and dcmtk.stop_requested(self.settings.verify_delay):
                return wrong
            listed = self._listed(destination, {f.study_uid for f in waiting.values()})
            if listed is None:
                return wrong  # no C-FIND here (said once) or the query failed: try later
            verified = []
            for uid, pacs_patient_id in listed.items():
                source = waiting.pop(uid, None)
                if source is None:
                    continue
                if pacs_patient_id == patient_id:
                    verified.append(source.key)
                else:
                    wrong[source.path] = (
                        f"{destination.label} files this instance (SOP Instance UID {uid}) under"
                        f" PatientID {pacs_patient_id!r}, not the folder's {patient_id!r}:"
                        " an existing record there may hold this instance; check the PACS")
            self.journal.mark_verified(destination.name, verified)
            if not waiting:
                break
        if waiting:
            self.journal.mark_not_found(
                destination.name, [f.key for f in waiting.values()],
                f"acknowledged by {destination.label} but not found by C-FIND")
        return wrong

    def already_there(self, destination: Destination, patient_id: str,
                      files: list[Instance]) -> set[str]:
        """Paths of files the PACS already lists under the folder's ID (from an earlier
        run whose acknowledgement was lost): they count as delivered without resending."""
        listed = self._listed(destination, {f.study_uid for f in files if f.study_uid})
        if not listed:
            return set()
        found = [f for f in files if listed.get(f.sop_uid) == patient_id]
        self.journal.record(destination.name,
                            [(f.key, True, False, "already in the PACS (C-FIND)") for f in found])
        self.journal.mark_verified(destination.name, [f.key for f in found])
        return {f.path for f in found}

    def _listed(self, destination: Destination, studies: set[str]) -> dict[str, str] | None:
        listed: dict[str, str] = {}
        for study in sorted(studies):
            result = dcmtk.find_instances(destination, study)
            if result.unsupported and destination.verify == "auto":
                with self.lock:
                    first = destination.name not in self.unsupported
                    self.unsupported.add(destination.name)
                if first:
                    warn("%s answers no C-FIND (%s): relying on its C-STORE answers"
                         " (verify = auto)", destination.label, result.error)
                return None
            if result.error:
                warn("C-FIND at %s failed: %s; files stay until it answers",
                     destination.label, result.error)
                return None
            listed.update(result.instances)
        return listed
