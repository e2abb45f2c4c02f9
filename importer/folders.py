"""Folder name -> patient identity.

The old script's pattern was ``^#([0-9]+)-([\\#^A-Za-z0-9]+)$``. Ours keeps its shape but
accepts every Unicode letter and digit in the name (Korean, Latin-1, ideographic PN
groups) and rejects anything a DICOM LO/PN value cannot hold.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from importer.logs import MASK

# Letters and digits of any script, plus PN's component (^), group (=) separators and '#'.
DEFAULT_PATTERN = r"^#(?P<id>[0-9]+)-(?P<name>(?=.*[^\W_])(?:[^\W_]|[\^#=])+)$"

MAX_ID_CHARS = 64  # LO
MAX_PN_GROUP_CHARS = 64  # PN, per component group
MAX_PN_GROUPS = 3


@dataclass(frozen=True)
class Patient:
    id: str
    name: str

    def is_ascii(self) -> bool:
        return self.name.isascii() and self.id.isascii()


class PatternError(ValueError):
    pass


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a FOLDER_PATTERN; it must have named groups ``id`` and ``name``."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise PatternError(f"not a valid regular expression: {exc}") from None
    missing = {"id", "name"} - set(compiled.groupindex)
    if missing:
        raise PatternError(
            f"needs named groups (?P<id>…) and (?P<name>…); missing {sorted(missing)}")
    return compiled


def parse_folder_name(folder_name: str, pattern: re.Pattern[str]) -> Patient | None:
    """The patient a folder is named after, or None when the name is not a valid identity."""
    if _has_forbidden_chars(folder_name):
        return None
    name = unicodedata.normalize("NFC", folder_name)  # macOS shares deliver NFD
    match = pattern.fullmatch(name)
    if match is None:
        return None
    patient = Patient(id=match.group("id"), name=match.group("name"))
    return patient if _fits_vr(patient) else None


def _is_forbidden(ch: str) -> bool:
    # Control and format characters, undecodable bytes (surrogate escapes), line separators,
    # path separators and backslash (DICOM's value separator).
    return unicodedata.category(ch) in ("Cc", "Cs", "Cf", "Zl", "Zp") or ch in "/\\"


def _has_forbidden_chars(text: str) -> bool:
    if text.isprintable():  # none of those categories (isprintable also rejects Zs but " ")
        return "/" in text or "\\" in text
    return any(_is_forbidden(ch) for ch in text)


def _fits_vr(patient: Patient) -> bool:
    if not patient.id or len(patient.id) > MAX_ID_CHARS:
        return False
    groups = patient.name.split("=")
    if not patient.name or len(groups) > MAX_PN_GROUPS:
        return False
    return all(len(group) <= MAX_PN_GROUP_CHARS for group in groups)


def mask_names(text: str, pattern: re.Pattern[str], show: bool) -> str:
    """A folder name or path with patient names hidden (show=False: LOG_PATIENT_NAMES)."""
    if show:
        return text
    parts = []
    for part in text.split("/"):
        patient = parse_folder_name(part, pattern)
        parts.append(f"#{patient.id}-{MASK}" if patient else part)
    return "/".join(parts)


def display(name: str) -> str:
    """A file or folder name safe to print on one line: odd characters escaped."""
    if name.isprintable() and "\\" not in name:
        return name  # no control, format, separator or undecodable character: the usual case
    out = []
    for ch in name:
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif _is_forbidden(ch) and ch != "/":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
