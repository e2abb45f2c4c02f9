"""findscu: what a PACS lists for a study (proof of delivery, audits), and what it knows of
a patient (reconciliation: many queries over one association)."""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from importer.config import Destination
from importer.dcmtk.dump import ELEMENT, PATIENT_ID, SOP_INSTANCE_UID, clean
from importer.dcmtk.echo import association_args
from importer.dcmtk.runner import ToolRun, run


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
    result.error, result.refused = _failure(tool_run)
    return result


def _failure(tool_run: ToolRun) -> tuple[str | None, bool]:
    """Why a findscu run failed (one short line; None: it did not), and whether that is a
    refusal to answer C-FIND from us rather than a PACS that is down."""
    problems = [line[3:] for line in tool_run.lines if line.startswith(("E: ", "F: "))]
    failures = [m["status"] for line in tool_run.lines if (m := _FINAL_FAILURE.search(line))]
    if tool_run.exit_code == 0 and not problems and not failures:
        return None, False
    said = [p for p in problems if _ERROR_CODE.search(p) or "Association" in p]
    error = "; ".join(dict.fromkeys(
        said or problems[:1] or [f"final response {f}" for f in failures]
        or [f"findscu exit code {tool_run.exit_code}"]))
    accepted = any("Association Accepted" in line for line in tool_run.lines)
    refused = bool(failures) or any(
        r in p for p in problems for r in _REFUSALS) and (
        accepted or not any("Association Request Failed" in p for p in problems))
    return error, refused


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


# --- batched queries (reconciliation) -------------------------------------------------------

# DICOM character sets a C-FIND answer may declare -> Python codecs (single-byte and UTF-8;
# anything else, e.g. ISO 2022 code extensions, is left undecoded: "not comparable").
_CODECS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 192": "utf-8", "ISO_IR 100": "latin-1",
           "ISO_IR 101": "iso8859-2", "ISO_IR 109": "iso8859-3", "ISO_IR 110": "iso8859-4",
           "ISO_IR 144": "iso8859-5", "ISO_IR 127": "iso8859-6", "ISO_IR 126": "iso8859-7",
           "ISO_IR 138": "iso8859-8", "ISO_IR 148": "iso8859-9", "ISO_IR 166": "tis-620",
           "GB18030": "gb18030", "GBK": "gbk"}
CHARSET_TAG = "0008,0005"
QUERY_LEVEL = "0008,0052"
_UI_TAGS = {"0020,000d", "0020,000e", "0008,0018"}  # padded with NUL, not space
UNDECODABLE = "\ufffd"  # a value whose character set this importer cannot read


@dataclass
class Query:
    """One C-FIND identifier: tag -> value ('' asks the PACS to return it)."""

    keys: dict[str, str]


@dataclass
class QueryAnswers:
    """The matches of one query (tag -> text value), or why it got none."""

    matches: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None


@dataclass
class BatchFind:
    """The answers to several queries sent over one association, in their order."""

    answers: list[QueryAnswers]
    error: str | None = None
    refused: bool = False  # as FindResult.refused: it answers no C-FIND from us


def find_many(destination: Destination, level: str, queries: Sequence[Query], *,
              worklist: bool = False) -> BatchFind:
    """Several C-FIND queries (Study Root, or Modality Worklist) over one association.

    findscu sends each query file given after the port as its own C-FIND: one process and
    one association for a batch of queries, where a findscu per query costs ~25 ms of CPU.
    The identifiers are a few elements each, written as Implicit VR Little Endian data
    sets (findscu reads a data set without meta header)."""
    with tempfile.TemporaryDirectory(prefix="importer-find-") as work:
        files = []
        for index, query in enumerate(queries):
            keys = dict(query.keys)
            if not worklist:
                keys.setdefault(QUERY_LEVEL, level)
            if not all(v.isascii() for v in keys.values()):
                keys[CHARSET_TAG] = "ISO_IR 192"
            path = os.path.join(work, f"{index}.dcm")
            with open(path, "wb") as fh:
                fh.write(_identifier(keys))
            files.append(path)
        args = ["-v", "-W" if worklist else "-S", *association_args(destination),
                destination.host, str(destination.port), *files]
        parser = _BatchParser(len(queries))
        tool_run = run("findscu", args, on_line=parser, network=True)
    parser.close()
    error, refused = _failure(tool_run)
    if error:
        for answers in parser.answers[parser.completed:]:
            answers.error = answers.error or error
    return BatchFind(parser.answers, error if parser.completed < len(queries) else None,
                     refused and parser.completed == 0)


def _identifier(keys: dict[str, str]) -> bytes:
    """An Implicit VR Little Endian data set of these elements (sorted by tag)."""
    out = bytearray()
    for tag in sorted(keys):
        group, element = (int(part, 16) for part in tag.split(","))
        value = keys[tag].encode("utf-8")
        if len(value) % 2:
            value += b"\0" if tag in _UI_TAGS else b" "
        out += struct.pack("<HHI", group, element, len(value)) + value
    return bytes(out)


class _BatchParser:
    """Splits `findscu -v` output over several queries: `Sending Find Request` starts the
    next query, `Find Response: n (Pending)` a match, `Received Final Find Response` ends it."""

    def __init__(self, count: int) -> None:
        self.answers = [QueryAnswers() for _ in range(count)]
        self.index = -1
        self.completed = 0  # queries that got their final response
        self.block: dict[str, str] | None = None

    def __call__(self, line: str) -> None:
        text = line[3:] if line.startswith("I: ") else line
        if text.startswith("Sending Find Request"):
            self.close()
            self.index += 1
        elif text.startswith("Find Response:"):
            self.close()
            self.block = {} if "(Pending)" in text else None
        elif text.startswith("Received Final Find Response"):
            self.close()
            if 0 <= self.index < len(self.answers):
                self.completed = self.index + 1
                if failure := _FINAL_FAILURE.search(text):
                    self.answers[self.index].error = f"final response {failure['status']}"
        elif self.block is not None and (element := ELEMENT.match(text)):
            self.block.setdefault(element["tag"], element["value"] or "")

    def close(self) -> None:
        if self.block is not None and 0 <= self.index < len(self.answers):
            charset = clean(self.block.get(CHARSET_TAG, ""))
            self.answers[self.index].matches.append(
                {tag: decode_value(value, charset) for tag, value in self.block.items()})
        self.block = None


def decode_value(value: str, charset: str) -> str:
    """A value as a DCMTK tool printed it (the file's or the PACS's bytes, read as UTF-8
    with surrogate escapes) decoded in the character set it is declared in."""
    charset = charset.split("\\")[-1].strip()
    if value.isascii():
        return clean(value)
    codec = _CODECS.get(charset)
    if codec is None:
        return UNDECODABLE
    try:
        return clean(value.encode("utf-8", "surrogateescape").decode(codec))
    except UnicodeError:
        return UNDECODABLE
