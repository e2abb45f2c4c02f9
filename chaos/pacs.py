"""The PACS side of a scenario: each destination's receiver, its faults, and what it holds."""

from __future__ import annotations

import hashlib
import io
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from chaos.scenario import Destination
from simsite.dicomgen import make_ct
from simsite.forgetful_pacs import ForgetfulPACS
from simsite.receivers import Orthanc, StoreSCP, free_port
from simsite.refusing_scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, RefusingSCP

# storescp in each of its moods (a scenario's DIMSE_TIMEOUT is shorter than its sleep).
STORESCP_MODES = {"normal": [], "refuse-association": ["--refuse"], "abort": ["--abort-after"],
                  "stall-dimse": ["--sleep-during", "6"]}


@dataclass(frozen=True)
class Holding:
    """One instance a PACS holds, as it arrived (the identity we sent)."""

    sop_uid: str
    patient_id: str
    patient_name: str
    pixels: str  # sha256 of its PixelData ("" without)
    pixel_length: int
    expected_length: int  # Rows × Columns × samples × bytes × frames: a decoded image's size


def holding(ds: Any) -> Holding:
    pixels = bytes(ds.PixelData) if "PixelData" in ds else b""
    expected = 0
    if "Rows" in ds and "BitsAllocated" in ds:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
    return Holding(str(ds.SOPInstanceUID), str(ds.get("PatientID", "")),
                   str(ds.get("PatientName", "")),
                   hashlib.sha256(pixels).hexdigest() if pixels else "", len(pixels), expected)


class Receiver:
    """One destination: starts, goes down, comes back, changes mood; says what it holds."""

    def __init__(self, destination: Destination, root: Path) -> None:
        self.destination = destination
        self.kind = destination.kind
        self.root = root / destination.name
        self.root.mkdir(parents=True)
        self.aet = destination.name.upper()[:16]
        self.port = free_port()
        self.lock = threading.Lock()  # one change of state at a time
        self.up = False
        self.server: Any = None
        if self.kind in ("orthanc", "orthanc-debian"):
            debian = {"DicomAlwaysAllowFind": False, "DicomModalities": {}}
            self.server = Orthanc(self.root, aet=self.aet, dicom_port=self.port,
                                  tcp_nodelay=self.kind == "orthanc",
                                  config=debian if self.kind == "orthanc-debian" else None)
        elif self.kind == "refusing":
            self.server = RefusingSCP(
                aet=self.aet,
                statuses=dict.fromkeys(destination.refuse, CANNOT_UNDERSTAND),
                first_times={u: (OUT_OF_RESOURCES, 2) for u in destination.transient})
            self.server.port = self.port
        elif self.kind == "forgetful":
            self.server = ForgetfulPACS(aet=self.aet, drop=set(destination.drop),
                                        refile={n: "SOMEONE-ELSE" for n in destination.refile},
                                        index_delay=destination.index_delay)
            self.server.port = self.port

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self, mood: str = "normal") -> None:
        with self.lock:
            if self.up:
                self._stop()
            if self.kind == "storescp":
                self.server = StoreSCP(self.root / "out", aet=self.aet, port=self.port,
                                       extra_args=["--fork", *STORESCP_MODES[mood]])
            deadline = time.monotonic() + 10
            while True:  # the children of a storescp --fork just stopped may hold the port
                try:
                    self.server.start()
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            self.up = True

    def stop(self) -> None:
        with self.lock:
            self._stop()

    def _stop(self) -> None:
        if self.up:
            self.server.stop()
            self.up = False

    def preload(self, patient_id: str, name: str, work: Path) -> str:
        """Store a patient the PACS already knows (another person under that ID)."""
        path = work / f"preload-{patient_id}.dcm"
        uid = make_ct(path, patient_id=patient_id, patient_name=name, birth_date="19500101",
                      sex="M", rows=16)
        subprocess.run(["storescu", "-aec", self.aet, self.host, str(self.port), str(path)],
                       check=True, capture_output=True, timeout=60)
        return uid

    def holdings(self) -> list[Holding]:
        if self.kind == "storescp":
            return [holding(pydicom.dcmread(p)) for p in sorted((self.root / "out").glob("*"))
                    if p.is_file()]
        if self.kind == "refusing":
            return [holding(ds) for ds in list(self.server.accepted.values())]
        if self.kind == "forgetful":
            return [holding(ds) for ds in list(self.server.received.values())]
        return [holding(pydicom.dcmread(io.BytesIO(self._orthanc_file(i))))
                for i in self.server.get("/instances")]

    def listed(self) -> dict[str, str]:
        """SOP Instance UID -> PatientID, as the PACS itself files them (what C-FIND would list)."""
        if self.kind == "forgetful":
            return {uid: pid for uid, (_, _, pid) in dict(self.server.kept).items()}
        return {h.sop_uid: h.patient_id for h in self.holdings()}

    def _orthanc_file(self, instance: str) -> bytes:
        req = f"{self.server.url}/instances/{instance}/file"
        with self.server._opener.open(req, timeout=30) as resp:
            return bytes(resp.read())
