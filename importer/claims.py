"""Whose is a study? What this importer itself has sent is something the site knows.

A study belongs to one patient. The same images in two folders under two PatientIDs (a CD
copied into the wrong patient's folder, a mistyped ID) means one of the folder names is
wrong; a PACS that answers no study-level C-FIND, or overwrites an instance sent again,
cannot say so, and would file one image under both people. Found by the fault campaign
(chaos seeds 51, 74, 201, 212). The journal remembers the PatientID each study was first
acknowledged under; within a batch, the first folder to go on claims its studies.
"""

from __future__ import annotations

import time

from importer.folders import display
from importer.journal import Journal
from importer.model import Folder

OWN_RECORD = "this importer's journal"  # as a source, in the hold and the receipt


class Claims:
    def __init__(self, journal: Journal | None) -> None:
        self.journal = journal  # None (a dry run): only this batch's folders are compared
        # study UID -> (PatientID, folder) of the folders this batch let go on
        self.claimed: dict[str, tuple[str, str]] = {}

    def conflicts(self, folder: Folder) -> list[str]:
        """The folder's studies sent under another PatientID, or carried by another folder
        of this batch under another ID: each in words."""
        studies = sorted({f.study_uid for f in folder.files if f.study_uid})
        sent = self.journal.studies_sent(studies) if self.journal is not None else {}
        found = []
        for study in studies:
            earlier = sent.get(study)
            claim = self.claimed.get(study)
            if earlier is not None and earlier.patient_id != folder.patient.id:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(earlier.sent_at))
                found.append(f"study {study} was sent by this importer under PatientID"
                             f" {earlier.patient_id!r} (folder {display(earlier.folder)},"
                             f" {when})")
            elif claim is not None and claim[0] != folder.patient.id:
                found.append(f"study {study} is also in folder {display(claim[1])}, under"
                             f" PatientID {claim[0]!r}")
        return found

    def claim(self, folder: Folder) -> None:
        """The folder goes on: its studies are its patient's for the rest of the batch."""
        for source in folder.files:
            if source.study_uid:
                self.claimed.setdefault(source.study_uid, (folder.patient.id, folder.name))
