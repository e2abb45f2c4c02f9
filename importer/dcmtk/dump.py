"""dcmftest and dcmdump: which files are DICOM, and what they say (many files a call)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from importer.dcmtk.runner import chunked, run

# --- dcmftest -------------------------------------------------------------------------


def dicom_magic(paths: Sequence[str]) -> dict[str, bool]:
    """Which files carry the DICM magic (a truncated file still says yes)."""
    found: dict[str, bool] = {}
    for chunk in chunked(paths):
        for line in run("dcmftest", chunk, data=("yes: ", "no: ")).lines:
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
ORIGINAL_ATTRIBUTES = "0400,0561"  # Original Attributes Sequence (its value: item count)
PIXEL_DATA_TAGS = ("7fe0,0010", "7fe0,0008", "7fe0,0009")  # integer, float, double float

# The lines of a dcmdump +F +p output that are its values: a file's header, an element
# (indented: inside a sequence).
DUMP_DATA = ("# dcmdump (", "(", " ")
_HEADER = re.compile(r"^# dcmdump \(\d+/\d+\): (?P<path>.*)$")
ELEMENT = re.compile(
    r"^\((?P<tag>[0-9a-f]{4},[0-9a-f]{4})\) (?P<vr>[A-Z]{2}) "
    r"(?:\[(?P<value>.*)\]|\(no value available\)|(?P<raw>.*?))\s+#\s*(?:\d+|u/l),"
)
_UN_BYTES = re.compile(r"^[0-9a-f]{2}(?:\\[0-9a-f]{2})*$")
_ITEMS = re.compile(r"#=(\d+)")


def _value(element: re.Match[str]) -> str:
    """An element's value as dcmdump shows it; a UN element's bytes decoded as text (UN
    UIDs and strings are still their values, in the file's character set)."""
    raw = element["raw"] or ""
    if element["vr"] == "SQ":  # "(Sequence with explicit length #=2)": its item count
        items = _ITEMS.search(raw)
        return items[1] if items else "0"
    if element["vr"] == "UN" and _UN_BYTES.match(raw):
        return clean(bytes.fromhex(raw.replace("\\", "")).decode("latin-1"))
    return clean(element["value"] or "")
_READ_ERROR = re.compile(r"^E: dcmdump: (?P<reason>.*?): reading file: (?P<path>.*)$")


@dataclass(slots=True)
class Dump:
    """Top-level values of the tags asked for, or why the file could not be read."""

    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    # Tags read with VR UN (an anonymiser's explicit-VR rewrite); the only VR anyone asks
    # about, so the others are not kept: 20,000 dumps stay small.
    un_tags: frozenset[str] = frozenset()  # (one shared empty set: 20,000 cost 4 MB)


# A call of more files than this is read by as many dcmdump processes as there are cores
# at once (two starts cost ~40 ms of CPU; at 1,000 files the read takes ~250 ms): the read
# is on the batch's longest path, while the sends and archiving run beside it.
PARALLEL_FILES = 200


def dump_tags(paths: Sequence[str], tags: Iterable[str]) -> dict[str, Dump]:
    """Read the given tags of many files in one dcmdump call per chunk.

    dcmdump parses each file completely, so a truncated or corrupt file is reported here
    as an error even when its header reads fine; -M leaves long values (pixel data) unloaded,
    so a tag asked for that holds one is present with an empty value.
    """
    tag_args = tuple(arg for tag in tags for arg in ("+P", tag))
    cores = os.cpu_count() or 1
    if cores == 1 or len(paths) < PARALLEL_FILES:
        dumps = _dump(paths, tag_args)
    else:
        share = -(-len(paths) // cores)
        with ThreadPoolExecutor(max_workers=cores, thread_name_prefix="dcmdump") as pool:
            parts = list(pool.map(lambda start: _dump(paths[start:start + share], tag_args),
                                  range(0, len(paths), share)))
        dumps = {path: dump for part in parts for path, dump in part.items()}
    for path in paths:
        if path not in dumps:
            dumps[path] = Dump(error="dcmdump did not report on this file")
    return {path: dumps[path] for path in paths}


def _dump(paths: Sequence[str], tag_args: tuple[str, ...]) -> dict[str, Dump]:
    # -Un: UIDs as numbers; by default a well-known one prints as `=Name`, not `[uid]`.
    parser = _DumpParser()
    for chunk in chunked(paths, fixed_bytes=sum(len(a) + 9 for a in tag_args)):
        parser.current = None
        run("dcmdump", ["-M", "+F", "+L", "+p", "-Un", *tag_args, *chunk], on_line=parser,
            data=DUMP_DATA)
    return parser.dumps


class _DumpParser:
    """Reads `dcmdump +F +p +P …` output: a header per file, then its elements."""

    def __init__(self) -> None:
        self.dumps: dict[str, Dump] = {}
        self.current: Dump | None = None
        self.pending_errors: list[str] = []
        # One object per distinct tag and per repeated value (a folder's files share their
        # IDs, names, UIDs of study and class, transfer syntax): 20,000 dumps stay small.
        self.shared: dict[str, str] = {}

    def __call__(self, line: str) -> None:
        # Most lines are a top-level element with a bracketed value: taken apart by slicing
        # (a third of the parse's CPU); +p's nested paths, UN, SQ and the rest by the regex.
        if (line[11:12] == " " and line[15:16] == "[" and line[:1] == "(" and line[12:14] != "UN"
                and self.current is not None):
            close = line.rfind("]")
            if close > 15 and line[close + 1:].lstrip().startswith("#"):
                self._keep(line[1:10], line[12:14], clean(line[16:close]))
                return
        if line[:1] == " ":
            return  # inside a sequence: only top-level values are kept
        if header := _HEADER.match(line):
            self.current = self.dumps.setdefault(header["path"], Dump())
        elif error := _READ_ERROR.match(line):
            dump = self.dumps.setdefault(error["path"], Dump())
            dump.error = "; ".join([*self.pending_errors, error["reason"]])
            self.pending_errors.clear()
        elif line.startswith(("E: ", "F: ")):
            self.pending_errors.append(line[3:])
        elif (element := ELEMENT.match(line)) and self.current is not None:
            # +p prefixes nested occurrences with their sequence path, so only top-level
            # elements match here.
            self._keep(element["tag"], element["vr"], _value(element))

    def _keep(self, tag: str, vr: str, value: str) -> None:
        """The first occurrence of a top-level tag is its value."""
        current = self.current
        assert current is not None
        tag = self.shared.setdefault(tag, tag)
        if tag not in current.values:
            current.values[tag] = (value if tag == SOP_INSTANCE_UID
                                   else self.shared.setdefault(value, value))
            if vr == "UN":
                current.un_tags |= {tag}


def clean(value: str) -> str:
    # UI values keep their NUL pad byte and LO/PN values a trailing space.
    return value.rstrip("\x00 ")
