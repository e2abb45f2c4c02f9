"""A PACS (pynetdicom, test-only) that acknowledges every C-STORE but does not keep its word.

It answers C-STORE Success for every instance, yet drops the ones listed in ``drop`` and
files those in ``refile`` under another PatientID, and answers Study Root C-FIND (IMAGE
level) from what it kept — the "it said SENT, but the PACS does not have it" case that only
asking back can catch. ``index_delay`` makes kept instances visible to C-FIND only after
that many seconds, like a PACS that indexes asynchronously. Instances are chosen by
InstanceNumber.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

logging.getLogger("pynetdicom").setLevel(logging.ERROR)


class ForgetfulPACS:
    def __init__(self, *, aet: str = "FORGETFUL", drop: set[int] | None = None,
                 refile: dict[int, str] | None = None, index_delay: float = 0.0) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.aet = aet
        self.drop = set(drop or ())
        self.refile = dict(refile or {})
        self.index_delay = index_delay
        self.stores: list[str] = []  # every SOP Instance UID it acknowledged, in order
        self.finds = 0
        self.kept: dict[str, tuple[float, str, str]] = {}  # uid -> (visible at, study, id)
        self.received: dict[str, Any] = {}  # uid -> the data set as it arrived (last one)
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        number = int(ds.get("InstanceNumber", 0) or 0)
        with self._lock:
            self.stores.append(ds.SOPInstanceUID)
            ds.file_meta = event.file_meta
            self.received[ds.SOPInstanceUID] = ds
            if number not in self.drop:
                patient_id = self.refile.get(number, ds.PatientID)
                self.kept[ds.SOPInstanceUID] = (time.monotonic() + self.index_delay,
                                                ds.StudyInstanceUID, patient_id)
        return 0x0000  # Success, whatever happened

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        study = query.get("StudyInstanceUID", "")
        now = time.monotonic()
        with self._lock:
            self.finds += 1
            matches = [(uid, pid) for uid, (visible, st, pid) in self.kept.items()
                       if st == study and visible <= now]
        for uid, patient_id in matches:
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            answer.StudyInstanceUID = study
            answer.SOPInstanceUID = uid
            answer.PatientID = patient_id
            yield 0xFF00, answer
        yield 0x0000, None

    def start(self) -> Self:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self._server = ae.start_server(
            (self.host, self.port), block=False,  # a restart keeps its port
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_FIND, self._on_find)])
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
