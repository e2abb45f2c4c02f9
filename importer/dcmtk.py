"""The only place that runs a DCMTK tool: argv in, parsed results out.

Every call goes through :func:`run`, which passes arguments as argv (never a shell),
streams the tool's output line by line, and logs one record per call (tool, argv, exit
code, seconds, output lines). Paths travel as ``surrogateescape`` strings both ways, so a
file name that is not valid UTF-8 reaches the tool byte for byte and comes back in its
output as the same Python string.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import sh

from importer import logs, metrics
from importer.config import Destination
from importer.folders import Patient

log = logging.getLogger("importer.dcmtk")

_FS_CODEC = "utf-8-fs"


def _find_fs_codec(name: str) -> codecs.CodecInfo | None:
    if name.replace("_", "-") != _FS_CODEC:
        return None
    return codecs.CodecInfo(
        name=_FS_CODEC,
        encode=lambda text, errors="strict": codecs.utf_8_encode(text, "surrogateescape"),
        decode=lambda data, errors="strict": codecs.utf_8_decode(data, "surrogateescape", True),
    )


codecs.register(_find_fs_codec)


def _quiet_sh_debug(logger: Any, message: str, *args: object) -> None:
    """sh formats every internal debug message (a repr per pipe read) even when nothing
    logs it: a fifth of its CPU on a large batch. Format only when someone listens."""
    if logger.log.isEnabledFor(logging.DEBUG):
        logger.log.debug(logger._format_msg(message, *args))


# sh's module object is replaced by a wrapper that resolves attributes as commands; its
# Logger class is reached through a function's globals. Left alone if sh ever changes.
_ShLogger = sh.Command.__call__.__globals__.get("Logger")
if _ShLogger is not None and hasattr(_ShLogger, "_format_msg"):
    _ShLogger.debug = _quiet_sh_debug

# One argv must stay well below the kernel's limit (ARG_MAX includes the environment).
_ARGV_BYTES = min(os.sysconf("SC_ARG_MAX") // 4, 512 * 1024)
_ARGV_FILES = 2000


class DcmtkMissing(Exception):
    """A DCMTK tool is not installed; the message says how to fix it."""


@dataclass
class ToolRun:
    tool: str
    argv: list[str]
    exit_code: int
    seconds: float
    lines: list[str] = field(default_factory=list)


class Stopped(Exception):
    """The importer is shutting down: no new DCMTK call starts."""


_running: dict[int, sh.RunningCommand] = {}
_running_lock = threading.Lock()
_stopping = threading.Event()


def request_stop() -> None:
    """On SIGTERM: end every running DCMTK process and refuse to start new ones.

    A killed storescu leaves its unanswered files for the next run; a killed dcmodify only
    ever works on copies.
    """
    _stopping.set()
    with _running_lock:
        for command in list(_running.values()):
            with contextlib.suppress(Exception):  # already gone
                command.terminate()


def stop_requested(wait: float) -> bool:
    """Sleep up to wait seconds; True at once if the importer is shutting down."""
    return _stopping.wait(wait)


@functools.cache
def tool_path(tool: str) -> str:
    """Where a DCMTK tool is: the first on PATH, never in this program's own Python
    environment (pynetdicom, a test dependency, installs scripts named storescu, findscu…
    there, which an activated virtualenv would otherwise put first)."""
    own_bin = os.path.dirname(os.path.abspath(sys.executable))
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not directory or os.path.abspath(directory) == own_bin:
            continue
        candidate = os.path.join(directory, tool)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise DcmtkMissing(f"{tool} not found — install dcmtk (apt-get install dcmtk)")


def run(
    tool: str,
    args: Sequence[str],
    *,
    on_line: Callable[[str], bool | None] | None = None,
    network: bool = False,
) -> ToolRun:
    """Run one DCMTK tool to completion, streaming its merged stdout/stderr to on_line;
    on_line returning True ends the tool early (e.g. storescu after a DIMSE timeout)."""
    if _stopping.is_set():
        raise Stopped(f"not starting {tool}: shutting down")
    command = sh.Command(tool_path(tool))
    env = dict(os.environ)
    if network:
        env["TCP_NODELAY"] = "1"  # avoids a ~44 ms Nagle/delayed-ACK stall per file
    lines: list[str] = []
    holder: list[sh.RunningCommand] = []
    give_up = threading.Event()

    def collect(line: str) -> None:
        line = line.rstrip("\r\n")
        lines.append(line)
        if on_line is not None and on_line(line) is True and not give_up.is_set():
            give_up.set()  # the parser has seen enough: end the tool now
            if holder:
                holder[0].terminate()

    started = time.monotonic()
    running = command(
        *args,
        _out=collect,
        _err_to_out=True,
        # With an output callback and no stdin, sh creates a stdin queue whose thread
        # polls every 0.1 s: +100 ms per call. DCMTK tools read no stdin.
        _in=b"",
        _tty_out=False,
        _bg=True,
        _bg_exc=False,
        _ok_code=list(range(256)),
        _encoding=_FS_CODEC,
        _env=env,
        _return_cmd=True,
        # sh's own debug logging formats the whole argv into every message, per output
        # line, even when nothing logs it: a short context keeps that cheap.
        _log_msg=lambda _cmd, _call_args, pid=None: f"{tool} {pid}",
    )
    holder.append(running)
    with _running_lock:
        _running[id(running)] = running
        if _stopping.is_set() or give_up.is_set():  # asked to stop while it was starting
            running.terminate()
    try:
        running.wait()
        exit_code = running.exit_code
    except sh.SignalException as exc:
        exit_code = -int(getattr(exc, "signal", 15) or 15)
    finally:
        with _running_lock:
            _running.pop(id(running), None)
    result = ToolRun(tool, [tool, *args], exit_code, time.monotonic() - started, lines)
    metrics.tool_ran(tool, result.seconds)
    argv, output = result.argv, lines
    if logs.hiding_names():  # LOG_PATIENT_NAMES=false: no PatientName value in the record
        argv = [mask_patient_name(arg) for arg in argv]
        output = [mask_patient_name(line) for line in lines]
    log.debug(
        "%s exit %s in %.3f s", tool, exit_code, result.seconds,
        extra={"tool": tool, "argv": argv, "exit_code": exit_code,
               "duration": round(result.seconds, 4), "output": output},
    )
    return result


# `(0010,0010)=<name>` in dcmodify's argv; `(0010,0010) PN [<name>]  # 8, 1 PatientName` (or
# a UN/SQ rendering) in dcmdump's output: the value up to the length comment goes.
_PATIENT_NAME_VALUE = re.compile(
    r"(?P<head>\(0010,0010\)(?:=| [A-Za-z]{2} ))(?P<value>.*?)(?=\s+#\s*(?:\d+|u/l),|$)")


def mask_patient_name(text: str) -> str:
    """text with any PatientName value, as DCMTK's argv and dumps spell it, replaced by ***."""
    if "(0010,0010)" not in text:
        return text
    return _PATIENT_NAME_VALUE.sub(lambda m: m["head"] + logs.MASK, text)


def chunked(paths: Sequence[str], fixed_bytes: int = 0) -> Iterator[list[str]]:
    """Split paths into argv-sized chunks."""
    chunk: list[str] = []
    size = fixed_bytes
    for path in paths:
        cost = len(path.encode("utf-8", "surrogateescape")) + 1 + 8  # + NUL + argv pointer
        if chunk and (size + cost > _ARGV_BYTES or len(chunk) >= _ARGV_FILES):
            yield chunk
            chunk, size = [], fixed_bytes
        chunk.append(path)
        size += cost
    if chunk:
        yield chunk


# --- dcmftest -------------------------------------------------------------------------


def dicom_magic(paths: Sequence[str]) -> dict[str, bool]:
    """Which files carry the DICM magic (a truncated file still says yes)."""
    found: dict[str, bool] = {}
    for chunk in chunked(paths):
        for line in run("dcmftest", chunk).lines:
            verdict, sep, path = line.partition(": ")
            if sep and verdict in ("yes", "no"):
                found[path] = verdict == "yes"
    return {path: found.get(path, False) for path in paths}


# --- dcmdump --------------------------------------------------------------------------

PATIENT_ID = "0010,0020"
PATIENT_NAME = "0010,0010"
CHARSET = "0008,0005"
BIRTH_DATE = "0010,0030"
SEX = "0010,0040"
SOP_INSTANCE_UID = "0008,0018"
STUDY_INSTANCE_UID = "0020,000d"
MEDIA_STORAGE_SOP_CLASS = "0002,0002"
TRANSFER_SYNTAX = "0002,0010"
SOP_CLASS = "0008,0016"
ROWS = "0028,0010"
PIXEL_DATA_TAGS = ("7fe0,0010", "7fe0,0008", "7fe0,0009")  # integer, float, double float

_HEADER = re.compile(r"^# dcmdump \(\d+/\d+\): (?P<path>.*)$")
_ELEMENT = re.compile(
    r"^\((?P<tag>[0-9a-f]{4},[0-9a-f]{4})\) (?P<vr>[A-Z]{2}) "
    r"(?:\[(?P<value>.*)\]|\(no value available\)|(?P<raw>.*?))\s+#\s*(?:\d+|u/l),"
)
_UN_BYTES = re.compile(r"^[0-9a-f]{2}(?:\\[0-9a-f]{2})*$")


def _value(element: re.Match[str]) -> str:
    """An element's value as dcmdump shows it; a UN element's bytes decoded as text (UN
    UIDs and strings are still their values, in the file's character set)."""
    raw = element["raw"] or ""
    if element["vr"] == "UN" and _UN_BYTES.match(raw):
        return _clean(bytes.fromhex(raw.replace("\\", "")).decode("latin-1"))
    return _clean(element["value"] or "")
_READ_ERROR = re.compile(r"^E: dcmdump: (?P<reason>.*?): reading file: (?P<path>.*)$")


@dataclass
class Dump:
    """Top-level values of the tags asked for, or why the file could not be read."""

    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    vrs: dict[str, str] = field(default_factory=dict)  # e.g. UN where an anonymiser wrote it


def dump_tags(paths: Sequence[str], tags: Iterable[str]) -> dict[str, Dump]:
    """Read the given tags of many files in one dcmdump call per chunk.

    dcmdump parses each file completely, so a truncated or corrupt file is reported here
    as an error even when its header reads fine; -M leaves long values (pixel data) unloaded,
    so a tag asked for that holds one is present with an empty value.
    """
    tag_args = [arg for tag in tags for arg in ("+P", tag)]
    # -Un: UIDs as numbers; by default a well-known one prints as `=Name`, not `[uid]`.
    parser = _DumpParser()
    for chunk in chunked(paths, fixed_bytes=sum(len(a) + 9 for a in tag_args)):
        parser.current = None
        run("dcmdump", ["-M", "+F", "+L", "+p", "-Un", *tag_args, *chunk], on_line=parser)
    dumps = parser.dumps
    for path in paths:
        if path not in dumps:
            dumps[path] = Dump(error="dcmdump did not report on this file")
    return {path: dumps[path] for path in paths}


class _DumpParser:
    """Reads `dcmdump +F +p +P …` output: a header per file, then its elements."""

    def __init__(self) -> None:
        self.dumps: dict[str, Dump] = {}
        self.current: Dump | None = None
        self.pending_errors: list[str] = []

    def __call__(self, line: str) -> None:
        if header := _HEADER.match(line):
            self.current = self.dumps.setdefault(header["path"], Dump())
        elif error := _READ_ERROR.match(line):
            dump = self.dumps.setdefault(error["path"], Dump())
            dump.error = "; ".join([*self.pending_errors, error["reason"]])
            self.pending_errors.clear()
        elif line.startswith(("E: ", "F: ")):
            self.pending_errors.append(line[3:])
        elif (element := _ELEMENT.match(line)) and self.current is not None:
            # +p prefixes nested occurrences with their sequence path, so only top-level
            # elements match here.
            self.current.values.setdefault(element["tag"], _value(element))
            self.current.vrs.setdefault(element["tag"], element["vr"])


def _clean(value: str) -> str:
    # UI values keep their NUL pad byte and LO/PN values a trailing space.
    return value.rstrip("\x00 ")


# --- dcmodify / dcmconv -----------------------------------------------------------------


def stamp_identity(paths: Sequence[str], patient: Patient, *, utf8: bool,
                   backup: bool) -> list[ToolRun]:
    """Insert-or-overwrite PatientID/PatientName (and the UTF-8 character set).

    With backup, dcmodify renames each original to ``<file>.bak`` before writing the new
    file; without (``-nb``) it rewrites in place, so callers must then pass copies, never
    the only original. The exit code and messages are not trusted; callers verify the
    result with dump_tags.
    """
    args = [*([] if backup else ["-nb"]), "-ie", "-nmu", "-i", f"(0010,0020)={patient.id}",
            "-i", f"(0010,0010)={patient.name}"]
    if utf8:
        args += ["-i", "(0008,0005)=ISO_IR 192"]
    fixed = sum(len(a.encode()) + 9 for a in args)
    return [run("dcmodify", [*args, *chunk]) for chunk in chunked(paths, fixed)]


def set_charset(paths: Sequence[str], charset: str) -> list[ToolRun]:
    """Insert-or-overwrite (0008,0005) in place, one call per chunk (``-nb``: copies only).

    Only relabels; the bytes of the text stay as they are. Callers convert right after and
    treat a failed conversion as the verdict, not this call's exit code.
    """
    args = ["-nb", "-ie", "-nmu", "-i", f"(0008,0005)={charset}"]
    fixed = sum(len(a.encode()) + 9 for a in args)
    return [run("dcmodify", [*args, *chunk]) for chunk in chunked(paths, fixed)]


def convert_to_utf8(source: str, target: str) -> ToolRun:
    """Re-encode every text element of one file to UTF-8 (dcmconv works one file a call)."""
    return run("dcmconv", ["+U8", source, target])


def convert_un(source: str, target: str) -> ToolRun:
    """A copy whose UN elements (of known tags) have their real VR: dcmodify cannot set a
    value in an element it reads as UN."""
    return run("dcmconv", ["+uc", source, target])


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
_DIMSE_TIMEOUT = "DIMSE No data available"  # storescu's wording for a DIMSE timeout
_CANNOT_CONVERT = re.compile(
    r"unable to convert dataset from '(?P<source>[^']*)' transfer syntax to '(?P<target>[^']*)'")
_STORE_REQUEST = re.compile(r"^I: Sending Store Request \(MsgID \d+, (?P<sop>[^)]*)\)")


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


# Decompressors for syntaxes a PACS may not accept (storescu 3.6.7 cannot convert them on
# the fly): transfer syntax -> (tool, lossless). JPEG 2000 has no decoder in DCMTK.
_DECOMPRESSORS = {
    "1.2.840.10008.1.2.4.57": ("dcmdjpeg", True), "1.2.840.10008.1.2.4.70": ("dcmdjpeg", True),
    "1.2.840.10008.1.2.4.50": ("dcmdjpeg", False), "1.2.840.10008.1.2.4.51": ("dcmdjpeg", False),
    "1.2.840.10008.1.2.4.80": ("dcmdjpls", True), "1.2.840.10008.1.2.4.81": ("dcmdjpls", False),
    "1.2.840.10008.1.2.5": ("dcmdrle", True),
}


def decompression_tool(transfer_syntax: str) -> tuple[str, bool] | None:
    """The DCMTK tool that decompresses this transfer syntax, and whether losslessly."""
    return _DECOMPRESSORS.get(transfer_syntax)


def decompress(source: str, target: str, transfer_syntax: str) -> ToolRun:
    """A copy of source in Explicit VR Little Endian (the tools' default output)."""
    tool, _lossless = _DECOMPRESSORS[transfer_syntax]
    return run(tool, [source, target])


def store(destination: Destination, paths: Sequence[str], proposal: str = "",
          on_answer: Callable[[str, StoreResult], None] | None = None,
          ) -> tuple[dict[str, StoreResult], str]:
    """Send files over one association per chunk; return each file's result.

    A file counts as delivered only by the PACS's own answer for it. Files for which no
    answer arrived (connection refused, association rejected or aborted) are TRANSIENT.
    The second value is the association-level error, if any.
    """
    # -R: propose only the SOP classes present, so classes outside storescu's default list
    # (e.g. Segmentation) can be sent too.
    args = ["-v", "-nh", "-R", *([proposal] if proposal else []),
            *_association_args(destination), destination.host, str(destination.port)]
    parser = _StoreParser(on_answer)
    fixed = sum(len(a) + 9 for a in args)
    for chunk in chunked(paths, fixed):
        parser.current = parser.failed = None
        tool_run = run("storescu", [*args, *chunk], on_line=parser, network=True)
        if tool_run.exit_code != 0 and not parser.association_errors:
            parser.association_errors.append(f"storescu exit code {tool_run.exit_code}")
    error = "; ".join(dict.fromkeys(parser.association_errors))
    results = parser.results
    for path in paths:
        if path not in results:
            results[path] = StoreResult(Outcome.TRANSIENT, error or "no answer from the PACS")
    return results, error


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
        if line.startswith(_SENDING):
            self.current, self.failed = line[len(_SENDING):], None
            self.sop, self.unconvertible = "", None
        elif request := _STORE_REQUEST.match(line):
            self.sop = request["sop"]
        elif (cannot := _CANNOT_CONVERT.search(line)) and self.current:
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


def _association_args(destination: Destination) -> list[str]:
    args = [
        "-aet", destination.calling_aet, "-aec", destination.called_aet,
        "-to", str(destination.connect_timeout), "-ta", str(destination.acse_timeout),
        "-td", str(destination.dimse_timeout),
    ]
    if destination.tls_key and destination.tls_cert:
        # -pw: an unencrypted key; DCMTK would otherwise prompt on stdin.
        args += ["+tls", str(destination.tls_key), str(destination.tls_cert), "-pw"]
    elif destination.tls_ca:
        args += ["+tla"]  # TLS without a client certificate
    if destination.tls_ca:
        args += ["+cf", str(destination.tls_ca)]  # verify the PACS against this CA
    return args


def echo(destination: Destination) -> ToolRun:
    """C-ECHO: does the PACS accept an association from us at all?"""
    return run("echoscu", ["-v", *_association_args(destination),
                           destination.host, str(destination.port)], network=True)


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
    args = ["-v", "-S", *_association_args(destination),
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
        elif self.block is not None and (element := _ELEMENT.match(text)):
            self.block.setdefault(element["tag"], _clean(element["value"] or ""))

    def close(self) -> None:
        if self.block and self.block.get(SOP_INSTANCE_UID):
            self.instances[self.block[SOP_INSTANCE_UID]] = self.block.get(PATIENT_ID, "")
        self.block = None


def versions() -> dict[str, str]:
    """Installed DCMTK tool versions (for `importer check` and logs)."""
    found = {}
    for tool in ("dcmftest", "dcmdump", "dcmodify", "dcmconv", "storescu", "echoscu", "findscu"):
        try:
            first = run(tool, ["--version"]).lines
        except DcmtkMissing as exc:
            found[tool] = str(exc)
            continue
        found[tool] = next((line for line in first if "dcmtk" in line), "unknown").strip("$ ")
    return found
