"""storescu: a file counts as delivered only by the PACS's answer for it."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import resource
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from importer.config import Destination
from importer.dcmtk.echo import association_args
from importer.dcmtk.runner import run

# Files per storescu run, at most (a start costs ~40 ms of CPU: negligible per 1,000).
MAX_FILES_PER_ASSOCIATION = 1000

# --- storescu ---------------------------------------------------------------------------


class Outcome(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # not sent, or the PACS was out of resources: try again later
    PERMANENT = "permanent"  # the PACS refused this file
    # The PACS accepts neither this file's transfer syntax for its SOP class nor one storescu
    # can convert it to: a decompressed copy may still go (decompression_tool).
    UNACCEPTED = "unaccepted"


@dataclass
class StoreResult:
    outcome: Outcome
    detail: str


_SENDING = "I: Sending file: "
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>.*)\)\s*$")
_BAD_FILE = re.compile(r"^E: Bad DICOM file: (?P<rest>.*)$")
_STORE_FAILED = "E: Store Failed, file: "
_NO_UID = "E: No SOP Class or Instance UID in file: "
# storescu -v prints progress dots after "XMIT:" without a newline, so the failure of a
# file sent after an abort arrives as "XMIT: E: Store Failed, file: …" (chaos seeds 31, 227).
_XMIT = "XMIT:"
_DIMSE_TIMEOUT = "DIMSE No data available"  # storescu's wording for a DIMSE timeout
_CANNOT_CONVERT = re.compile(
    r"unable to convert dataset from '(?P<source>[^']*)' transfer syntax to '(?P<target>[^']*)'")
_STORE_REQUEST = re.compile(r"^I: Sending Store Request \(MsgID \d+, (?P<sop>[^)]*)\)")

_NO_CONTEXT = "No presentation context for: "
# The SOP classes storescu proposes without -R (DCMTK 3.6.7: `storescu -d` lists them even
# against a closed port); a file of another class needs -R.
STORESCU_PROPOSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2",
    "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1.3",
    "1.2.840.10008.5.1.4.1.1.1.3.1", "1.2.840.10008.5.1.4.1.1.104.1",
    "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.11.2",
    "1.2.840.10008.5.1.4.1.1.11.3", "1.2.840.10008.5.1.4.1.1.11.4",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.1.1",
    "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.12.2.1",
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.2",
    "1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.5.1.4.1.1.481.2",
    "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7", "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.66.1",
    "1.2.840.10008.5.1.4.1.1.66.2", "1.2.840.10008.5.1.4.1.1.67",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.77.1.1",
    "1.2.840.10008.5.1.4.1.1.77.1.2", "1.2.840.10008.5.1.4.1.1.77.1.3",
    "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2", "1.2.840.10008.5.1.4.1.1.77.1.5.3",
    "1.2.840.10008.5.1.4.1.1.77.1.5.4", "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.40", "1.2.840.10008.5.1.4.1.1.88.50",
    "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.88.65",
    "1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.69",
    "1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.840.10008.5.1.4.1.1.9.1.2",
    "1.2.840.10008.5.1.4.1.1.9.1.3", "1.2.840.10008.5.1.4.1.1.9.2.1",
    "1.2.840.10008.5.1.4.1.1.9.3.1", "1.2.840.10008.5.1.4.1.1.9.4.1",
})


def classify_status(status: str) -> Outcome:
    """Map storescu's status text (DU_cstoreStatusString) to what it means for the file."""
    if status.startswith(("Success", "Warning")):
        return Outcome.DELIVERED
    if status.startswith("Refused: OutOfResources"):
        return Outcome.TRANSIENT
    if match := re.search(r"0x([0-9a-fA-F]{1,4})\b", status):  # DCMTK drops leading zeros
        code = int(match.group(1), 16)
        if code == 0 or code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
            return Outcome.DELIVERED
        if 0xA700 <= code <= 0xA7FF:
            return Outcome.TRANSIENT
    return Outcome.PERMANENT


# storescu proposes uncompressed transfer syntaxes unless told otherwise; a compressed file
# then fails with "DIMSE Failed to send message". Option per (compressed) transfer syntax.
_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.100": "-xm", "1.2.840.10008.1.2.4.101": "-xh",
    "1.2.840.10008.1.2.4.102": "-xn", "1.2.840.10008.1.2.4.103": "-xl",
    "1.2.840.10008.1.2.4.104": "-x2", "1.2.840.10008.1.2.4.105": "-x3",
    "1.2.840.10008.1.2.4.106": "-xo", "1.2.840.10008.1.2.4.107": "-x4",
    "1.2.840.10008.1.2.4.108": "-x5", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def proposal_for(transfer_syntax: str) -> str:
    """The storescu option that proposes this transfer syntax ('' = uncompressed default)."""
    return _PROPOSE.get(transfer_syntax, "")


def store(destination: Destination, paths: Sequence[str], proposal: str = "",
          on_answer: Callable[[str, StoreResult], None] | None = None,
          still: Callable[[str, os.stat_result], bool] | None = None,
          sop_classes: Mapping[str, str] | None = None,
          ) -> tuple[dict[str, StoreResult], str]:
    """Send files over one association per chunk; return each file's result.
    sop_classes (path -> SOP Class UID): when all are in storescu's default proposal,
    storescu goes without -R.

    A file counts as delivered only by the PACS's own answer for it. Files for which no
    answer arrived (connection refused, association rejected or aborted) are TRANSIENT.
    The second value is the association-level error, if any.

    Each file is opened before storescu starts and storescu reads that open file
    (/dev/fd/N), not the path: a copy landing on the path meanwhile is not what goes (it
    went unstamped, chaos seeds 54, 158, 209, 211). still(path, stat) says whether the
    opened file is the version meant to go; one that is not stays for its next run.
    """
    # -R: propose only the SOP classes present, so classes outside storescu's default list
    # (e.g. Segmentation) can be sent too; it costs a read of every file before the
    # association (~0.1 ms a file), so files of default classes go without it.
    required = bool(proposal) or sop_classes is None or not all(
        sop_classes.get(path, "") in STORESCU_PROPOSES for path in paths)

    def argv(only_required: bool) -> list[str]:
        return ["-v", "-nh", *(["-R"] if only_required else []), *([proposal] if proposal else []),
                *association_args(destination), destination.host, str(destination.port)]

    pinned: dict[str, tuple[int, os.stat_result]] = {}

    def answered(path: str, result: StoreResult) -> None:
        """Written to in place while storescu read it: what the PACS got is not that file."""
        fd, before = pinned[path]
        now = os.fstat(fd)
        if result.outcome is Outcome.DELIVERED and (now.st_size, now.st_mtime_ns) != (
                before.st_size, before.st_mtime_ns):
            result.outcome, result.detail = Outcome.TRANSIENT, "written to while being sent"
        if on_answer is not None:
            on_answer(path, result)

    parser = _StoreParser(answered)
    left = list(paths)
    while left:
        pinned, left = _pin(left, parser.results, still)
        if not pinned:
            continue
        parser.current = parser.failed = None
        files = {fd: path for path, (fd, _st) in pinned.items()}
        try:
            tool_run = run("storescu", [*argv(required), *(f"/dev/fd/{fd}" for fd in files)],
                           on_line=parser, network=True, pinned=files)
        finally:
            for fd in files:
                os.close(fd)
        if tool_run.exit_code != 0 and not parser.association_errors:
            parser.association_errors.append(f"storescu exit code {tool_run.exit_code}")
        if not required and (unproposed := _unproposed(pinned, parser.results)):
            # A class this storescu does not propose by default after all (another DCMTK
            # release): those files go again, with -R, before any answer is given for them.
            for path in unproposed:
                del parser.results[path]
            left, required = [*unproposed, *left], True
    error = "; ".join(dict.fromkeys(parser.association_errors))
    results = parser.results
    for path in paths:
        if path not in results:
            results[path] = StoreResult(Outcome.TRANSIENT, error or "no answer from the PACS")
    return results, error


def _unproposed(pinned: Mapping[str, object], results: Mapping[str, StoreResult]) -> list[str]:
    """The files of this run that storescu had no presentation context for."""
    return [path for path in pinned if (result := results.get(path)) is not None
            and result.outcome is Outcome.PERMANENT and result.detail.startswith(_NO_CONTEXT)]


def _pin(paths: list[str], results: dict[str, StoreResult],
         still: Callable[[str, os.stat_result], bool] | None,
         ) -> tuple[dict[str, tuple[int, os.stat_result]], list[str]]:
    """Open up to one association's worth of files: path -> (descriptor, its stat as
    opened), and the paths left. A file that is gone or is no longer the version meant
    gets its result here."""
    pinned: dict[str, tuple[int, os.stat_result]] = {}
    for index, path in enumerate(paths):
        if len(pinned) >= files_per_association():
            return pinned, paths[index:]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EMFILE and pinned:  # the rest goes in the next chunk
                return pinned, paths[index:]
            results[path] = StoreResult(Outcome.TRANSIENT, f"not sent: {exc.strerror}")
            continue
        st = os.fstat(fd)
        if still is not None and not still(path, st):
            os.close(fd)
            results[path] = StoreResult(
                Outcome.TRANSIENT, "not sent: replaced since it was stamped (it goes at its"
                " next quiet period)")
            continue
        pinned[path] = (fd, st)
    return pinned, []


@functools.cache
def files_per_association() -> int:
    """Files per storescu run: each is held open while it runs, and a few run at once per
    destination (16 at once fit: four destinations of four associations). The soft
    descriptor limit is raised to the hard one first (Docker's default soft limit can be
    1,024; at 20,000, a 32nd of it split each 1,000-file association in two starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return MAX_FILES_PER_ASSOCIATION
    return max(16, min(MAX_FILES_PER_ASSOCIATION, (soft - 256) // 16))


class _StoreParser:
    """Pairs `storescu -v` lines: `Sending file: <path>` then the PACS's answer for it."""

    def __init__(self, on_answer: Callable[[str, StoreResult], None] | None = None) -> None:
        self.results: dict[str, StoreResult] = {}
        self.association_errors: list[str] = []
        self.current: str | None = None
        self.failed: str | None = None
        self.sop: str = ""  # storescu's short name of the current file's SOP class
        self.unconvertible: str | None = None  # why the current file's syntax cannot go
        self.on_answer = on_answer  # told each PACS answer as it arrives

    def __call__(self, line: str) -> bool:
        """Returns True when the rest of this association is not worth waiting for."""
        if line.startswith(_XMIT):  # progress dots, then maybe a message on the same line
            line = line[len(_XMIT):].lstrip(" .")
        if line.startswith(_SENDING):
            self.current, self.failed = line[len(_SENDING):], None
            self.sop, self.unconvertible = "", None
        elif request := _STORE_REQUEST.match(line):
            self.sop = request["sop"]
        elif ("unable to convert" in line and (cannot := _CANNOT_CONVERT.search(line))
              and self.current):
            self.unconvertible = (f"the PACS accepts no {cannot['source']} for this file's"
                                  f" SOP class ({self.sop or 'see the file'})")
        elif (response := _RESPONSE.match(line)) and self.current:
            status = response["status"]
            result = self.results[self.current] = StoreResult(classify_status(status), status)
            if self.on_answer is not None:
                self.on_answer(self.current, result)
            self.current = None
        elif _BAD_FILE.match(line) and self.current:
            self.results[self.current] = StoreResult(Outcome.PERMANENT, line[3:])
            self.current = None
        elif line.startswith(_STORE_FAILED):
            self.failed = line[len(_STORE_FAILED):].rstrip(":")
            self.results[self.failed] = (
                StoreResult(Outcome.UNACCEPTED, self.unconvertible) if self.unconvertible
                else StoreResult(Outcome.TRANSIENT, "store failed"))
            self.current = self.unconvertible = None
        elif line.startswith(_NO_UID):  # found while checking input files
            self.results[line[len(_NO_UID):]] = StoreResult(Outcome.PERMANENT, line[3:])
        elif line.startswith(("E: ", "F: ")):
            if self.failed:
                self.results[self.failed].detail += ": " + line[3:]
                if _DIMSE_TIMEOUT in line:
                    # storescu -nh would go on, one full DIMSE timeout per file.
                    self.association_errors.append(
                        f"the PACS stopped answering ({line[3:]}); the rest of this"
                        " association is left for the next attempt")
                    return True
            if line.startswith("F: ") or "Association" in line:
                self.association_errors.append(line[3:])
            elif not self.failed and self.current and self.current not in self.results:
                # e.g. "No presentation context for: (SG) …": the PACS accepted no
                # context for this file's SOP class and transfer syntax.
                self.results[self.current] = StoreResult(Outcome.PERMANENT, line[3:])
        return False
