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

from importer import dcmtk, metrics
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
        self.refused: dict[str, str] = {}  # destination -> why it answers no C-FIND from us
        self.lock = threading.Lock()

    def applies(self, destination: Destination) -> bool:
        """Whether files must be listed by C-FIND at this destination before archiving."""
        if destination.verify == "none":
            return False
        return destination.verify == "c-find" or destination.name not in self.refused

    def verify(self, destination: Destination, patient_id: str,
               files: Iterable[Instance]) -> dict[str, str]:
        """Query until every file is listed (or attempts run out); record the verdicts.

        Returns path -> reason for files the PACS filed under another PatientID: those
        must never be archived silently. Files sharing a SOP Instance UID (the same image
        twice) share its verdict: the PACS holds one instance per UID.
        """
        waiting: dict[str, list[Instance]] = {}
        for f in files:
            if f.sop_uid:
                waiting.setdefault(f.sop_uid, []).append(f)
        wrong: dict[str, str] = {}
        for attempt in range(self.settings.verify_attempts):
            if attempt and dcmtk.stop_requested(self.settings.verify_delay):
                return wrong
            studies = {f.study_uid for same in waiting.values() for f in same}
            listed, failed = self._listed(destination, studies)
            if listed is None:  # refused (auto: the C-STORE answers are the verdict) or down
                self._no_verdict(destination, [f for same in waiting.values() for f in same])
                return wrong
            if failed:  # those studies only: they wait, or after enough tries rely on C-STORE
                stuck = [f for same in waiting.values() for f in same if f.study_uid in failed]
                for study, why in failed.items():
                    self.journal.mark_unverified(
                        destination.name, [f.key for f in stuck if f.study_uid == study],
                        f"C-FIND failed for its study: {why}",
                        give_up_after=self.settings.max_attempts
                        if destination.verify == "auto" else 0)
                waiting = {uid: same for uid, same in waiting.items()
                           if same[0].study_uid not in failed}
            verified = []
            for uid, pacs_patient_id in listed.items():
                for source in waiting.pop(uid, []):
                    if pacs_patient_id == patient_id:
                        verified.append(source.key)
                    else:
                        wrong[source.path] = (
                            f"{destination.label} files this instance (SOP Instance UID {uid})"
                            f" under PatientID {pacs_patient_id!r}, not the folder's"
                            f" {patient_id!r}: an existing record there may hold this instance;"
                            " check the PACS")
            self.journal.mark_verified(destination.name, verified)
            metrics.inc("dicom_importer_verify_total", len(verified),
                        destination=destination.name, verdict="listed")
            if not waiting:
                break
        if wrong:
            metrics.inc("dicom_importer_verify_total", len(wrong), destination=destination.name,
                        verdict="under_another_patient_id")
        if waiting:
            metrics.inc("dicom_importer_verify_total", sum(map(len, waiting.values())),
                        destination=destination.name, verdict="not_found")
            self.journal.mark_not_found(
                destination.name, [f.key for same in waiting.values() for f in same],
                f"acknowledged by {destination.label} but not found by C-FIND")
        return wrong

    def rely_on_store(self, destination: Destination, files: Iterable[Instance]) -> None:
        """Where no C-FIND can tell (auto), the C-STORE answer is the verdict, remembered so
        that a later run never asks this destination about these files again."""
        why = self.refused.get(destination.name, "no C-FIND")
        files = list(files)
        metrics.inc("dicom_importer_verify_total", len(files), destination=destination.name,
                    verdict="c_store_only")
        self.journal.mark_verified(destination.name, [f.key for f in files], by="c-store",
                                   why=why)

    def already_there(self, destination: Destination, patient_id: str,
                      files: list[Instance]) -> set[str]:
        """Paths of files the PACS already lists under the folder's ID (from an earlier
        run whose acknowledgement was lost): they count as delivered without resending."""
        listed, _failed = self._listed(destination, {f.study_uid for f in files if f.study_uid})
        if not listed:
            return set()
        found = [f for f in files if listed.get(f.sop_uid) == patient_id]
        self.journal.record(destination.name,
                            [(f.key, True, False, "already in the PACS (C-FIND)") for f in found])
        self.journal.mark_verified(destination.name, [f.key for f in found])
        return {f.path for f in found}

    def _no_verdict(self, destination: Destination, files: list[Instance]) -> None:
        if destination.name in self.refused and destination.verify == "auto":
            self.rely_on_store(destination, files)
        elif destination.name in self.refused:  # c-find required: the files wait
            self.journal.mark_unverified(destination.name, [f.key for f in files],
                                         self.refused[destination.name])

    def _listed(self, destination: Destination,
                studies: set[str]) -> tuple[dict[str, str] | None, dict[str, str]]:
        """SOP Instance UID -> PatientID for the studies, and the studies whose query failed
        (while the PACS answered others); None when it answers no C-FIND from us at all,
        or is down."""
        listed: dict[str, str] = {}
        failed: dict[str, str] = {}
        for study in sorted(studies):
            if destination.name in self.refused:
                return None, {}
            result = dcmtk.find_instances(destination, study)
            if result.refused:
                self.note_refused(destination, result.error or "refused")
                return None, {}
            if result.error and _down(result):
                warn("C-FIND at %s failed: %s; files stay until it answers",
                     destination.label, result.error)
                return None, {}
            if result.error:
                failed[study] = result.error
                continue
            listed.update(result.instances)
        return listed, failed

    def note_refused(self, destination: Destination, error: str, identity: str = "") -> None:
        """It answers no C-FIND from us (seen here, or by reconcile.py, which adds what that
        means for the patient identity): said once, in one line."""
        purpose = "verified" if destination.verify != "none" else "checked"
        why = (f"{destination.label} answers no C-FIND from {destination.calling_aet}"
               f" ({error}). To have files {purpose} there, {find_fix(destination)}")
        with self.lock:
            first = destination.name not in self.refused
            self.refused[destination.name] = why
        if first:
            then = {"auto": "relying on its C-STORE answers (verify = auto)",
                    "c-find": "files wait for it (verify = c-find)"}.get(destination.verify)
            warn("%s", "; ".join(part for part in (why, then, identity) if part))


def find_fix(destination: Destination) -> str:
    """What lets this importer query a PACS that refuses its C-FIND."""
    aet = destination.calling_aet
    return (f"let {aet} query it (Orthanc: add {aet} to DicomModalities, or set"
            " DicomAlwaysAllowFind)")


def _down(result: dcmtk.FindResult) -> bool:
    return "Association Request Failed" in (result.error or "")
