"""findscu: what a PACS lists for a study (proof of delivery, audits)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from importer.config import Destination
from importer.dcmtk.dump import ELEMENT, PATIENT_ID, SOP_INSTANCE_UID, clean
from importer.dcmtk.runner import run
from importer.dcmtk.store import association_args


@dataclass
class FindResult:
    """What a PACS lists for one study: SOP Instance UID -> PatientID it is filed under."""

    instances: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # one short line; the whole output is in the JSON log
    # The PACS will not answer C-FIND from us: it has no such service (storescp), or it
    # rejects or aborts our query association or refuses the query (Orthanc as Debian ships
    # it, for AEs not in DicomModalities). Not a PACS that is down.
    refused: bool = False


_REFUSALS = ("No Acceptable Presentation Contexts", "Association Rejected",
             "Peer aborted Association", "Peer Aborted Association")
_FINAL_FAILURE = re.compile(r"Received Final Find Response \((?!Success)(?P<status>[^)]*)")
_ERROR_CODE = re.compile(r"\b[0-9a-f]{4}:[0-9a-f]{4}\b")


def find_instances(destination: Destination, study_uid: str) -> FindResult:
    """One C-FIND (Study Root, IMAGE level) listing every instance of a study."""
    args = ["-v", "-S", *association_args(destination),
            "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid}",
            "-k", "SOPInstanceUID", "-k", "PatientID",
            destination.host, str(destination.port)]
    parser = _FindParser()
    tool_run = run("findscu", args, on_line=parser, network=True)
    parser.close()
    result = FindResult(parser.instances)
    problems = [line[3:] for line in tool_run.lines if line.startswith(("E: ", "F: "))]
    failures = [m["status"] for line in tool_run.lines if (m := _FINAL_FAILURE.search(line))]
    if tool_run.exit_code != 0 or problems or failures:
        said = [p for p in problems if _ERROR_CODE.search(p) or "Association" in p]
        result.error = "; ".join(dict.fromkeys(
            said or problems[:1] or [f"final response {f}" for f in failures]
            or [f"findscu exit code {tool_run.exit_code}"]))
        accepted = any("Association Accepted" in line for line in tool_run.lines)
        result.refused = bool(failures) or any(
            r in p for p in problems for r in _REFUSALS) and (
            accepted or not any("Association Request Failed" in p for p in problems))
    return result


class _FindParser:
    """Collects (SOPInstanceUID, PatientID) from each `Find Response: n (Pending)` block."""

    def __init__(self) -> None:
        self.instances: dict[str, str] = {}
        self.block: dict[str, str] | None = None

    def __call__(self, line: str) -> None:
        text = line[3:] if line.startswith("I: ") else line
        if text.startswith("Find Response:") or text.startswith("Received Final Find"):
            self.close()
            self.block = {} if "(Pending)" in text else None
        elif self.block is not None and (element := ELEMENT.match(text)):
            self.block.setdefault(element["tag"], clean(element["value"] or ""))

    def close(self) -> None:
        if self.block and self.block.get(SOP_INSTANCE_UID):
            self.instances[self.block[SOP_INSTANCE_UID]] = self.block.get(PATIENT_ID, "")
        self.block = None
