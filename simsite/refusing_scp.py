"""A Storage SCP (pynetdicom, test-only) that answers chosen C-STORE statuses for chosen instances.

DCMTK's ``storescp`` can only refuse or abort a whole association; a real PACS also refuses
single instances with a status (0xA700 out of resources, 0xA900 data set does not match the
SOP class, 0xC000 cannot understand). This receiver does that, in a thread of the test
process, on a free loopback port::

    with RefusingSCP(statuses={3: 0xC000}, first_times={5: (0xA700, 2)}) as pacs:
        site.use(pacs)  # host, port, aet like simsite.receivers.StoreSCP
        ...
        pacs.accepted_uids()   # what it stored (every accepted instance, in memory)
        pacs.requests          # every C-STORE it answered: (uid, instance number, status)

Instances are chosen by InstanceNumber (``int`` keys) or SOPInstanceUID (``str`` keys).
``statuses`` are answered every time; ``first_times`` entries ``key: (status, n)`` are
answered the first n times that instance arrives, then it is accepted (transient → retry →
success).

Orthanc is no substitute: Orthanc 1.10's Lua ``ReceivedInstanceFilter`` returning false
answers C-STORE with **Success** (0x0000) and discards the instance, so it never produces a
per-file failure status (that "acknowledged but not stored" case is found by C-FIND).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pynetdicom import AE, StoragePresentationContexts, evt

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# pynetdicom logs every refusal it sends as a warning; the tests assert on the importer's output.
logging.getLogger("pynetdicom").setLevel(logging.ERROR)


def is_stored(status: int) -> bool:
    """Success or a warning: the PACS keeps the instance (PS3.4 B.2.3, PS3.7 C.4)."""
    return status in (SUCCESS, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


@dataclass(frozen=True)
class Request:
    uid: str
    instance_number: int | None
    status: int


class RefusingSCP:
    """pynetdicom Storage SCP on 127.0.0.1 answering chosen statuses for chosen instances."""

    def __init__(
        self,
        *,
        aet: str = "REFUSER",
        statuses: dict[int | str, int] | None = None,
        first_times: dict[int | str, tuple[int, int]] | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = 0  # known once started
        self.aet = aet
        self.statuses = dict(statuses or {})
        self.first_times = dict(first_times or {})
        self.requests: list[Request] = []
        self.accepted: dict[str, Any] = {}  # SOPInstanceUID -> pydicom Dataset (last one kept)
        self._refused_so_far: dict[int | str, int] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def label(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"

    def _status_for(self, uid: str, number: int | None) -> int:
        for key in (uid, number):
            if key in self.statuses:
                return self.statuses[key]
        for key in (uid, number):
            if key in self.first_times:
                status, times = self.first_times[key]
                done = self._refused_so_far.get(key, 0)
                if done < times:
                    self._refused_so_far[key] = done + 1
                    return status
                return SUCCESS
        return SUCCESS

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
        with self._lock:
            status = self._status_for(uid, number)
            self.requests.append(Request(uid, number, status))
            if is_stored(status):
                self.accepted[uid] = ds
        return status

    def accepted_uids(self) -> set[str]:
        with self._lock:
            return set(self.accepted)

    def answered(self, status: int) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.status == status]

    def start(self) -> Self:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = StoragePresentationContexts
        ae.maximum_pdu_size = 0  # no limit, like storescp
        # A restart (a PACS down and up again) keeps the port it had.
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])
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
