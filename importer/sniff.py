"""What a file without the DICM magic is: plainly something else, or perhaps a DICOM file
still arriving — and, for the summary line, what kind of thing was not sent.

A copy that stalls leaves a file empty, short, or preallocated with zeros (DESIGN.md, "The
share"): such a file must wait. But a patient folder also holds what people and CDs bring
along — a DICOMDIR, the viewer's programs, pages and fonts, autorun.inf, notes.txt — and a
settled file of that kind must not hold its folder for INCOMPLETE_GRACE. A DICOM file's first
132 bytes are its preamble (usually zeros) and "DICM", so a file that starts with text or with
another format's signature will not become DICOM. Pure functions of the file's first bytes and
its name: no I/O here.
"""

from __future__ import annotations

import re

PREAMBLE_AND_MAGIC = 132
HEAD_BYTES = 512  # enough to tell text from binary, and every signature below

# Signatures at offset 0 (format, kind). TIFF is left out on purpose: PS3.10 lets a DICOM
# file's preamble hold a TIFF header (dual-personality files), so a short file starting
# with one may be a DICOM file still arriving.
_PROGRAM, _FONT, _ARCHIVE, _DOCUMENT, _PICTURE, _TEXT = (
    "program", "font", "archive", "document", "picture", "text")
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"MZ", "a Windows program or library", _PROGRAM),
    (b"\x7fELF", "a Unix program or library", _PROGRAM),
    (b"\xca\xfe\xba\xbe", "a Java class or Mach-O program", _PROGRAM),
    (b"\xcf\xfa\xed\xfe", "a Mach-O program", _PROGRAM),
    (b"\xce\xfa\xed\xfe", "a Mach-O program", _PROGRAM),
    (b"MSCF", "a Windows cabinet", _PROGRAM),
    (b"ITSF", "a Windows help file", _PROGRAM),
    (b"L\x00\x00\x00\x01\x14\x02\x00", "a Windows shortcut", _PROGRAM),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an installer or Office document", _DOCUMENT),
    (b"\x00\x01\x00\x00\x00", "a TrueType font", _FONT),
    (b"OTTO", "an OpenType font", _FONT),
    (b"true\x00", "a TrueType font", _FONT),
    (b"ttcf", "a TrueType font collection", _FONT),
    (b"wOFF", "a web font", _FONT),
    (b"wOF2", "a web font", _FONT),
    (b"\x00\x00\x01\x00", "an icon", _PROGRAM),
    (b"\x00\x00\x02\x00", "a cursor", _PROGRAM),
    (b"PK\x03\x04", "a ZIP archive", _ARCHIVE),
    (b"PK\x05\x06", "an empty ZIP archive", _ARCHIVE),
    (b"PK\x07\x08", "a spanned ZIP archive", _ARCHIVE),
    (b"\x1f\x8b", "a gzip file", _ARCHIVE),
    (b"BZh", "a bzip2 file", _ARCHIVE),
    (b"\xfd7zXZ\x00", "an xz file", _ARCHIVE),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", _ARCHIVE),
    (b"Rar!\x1a\x07", "a RAR archive", _ARCHIVE),
    (b"%PDF", "a PDF document", _DOCUMENT),
    (b"%!PS", "a PostScript document", _DOCUMENT),
    (b"{\\rtf", "an RTF document", _DOCUMENT),
    (b"SQLite format 3\x00", "an SQLite database", _DOCUMENT),
    (b"\xff\xd8\xff", "a JPEG picture", _PICTURE),
    (b"\x89PNG\r\n\x1a\n", "a PNG picture", _PICTURE),
    (b"GIF87a", "a GIF picture", _PICTURE),
    (b"GIF89a", "a GIF picture", _PICTURE),
    (b"BM", "a BMP picture", _PICTURE),
    (b"\xff\xfe", "UTF-16 text", _TEXT),
    (b"\xfe\xff", "UTF-16 text", _TEXT),
)
# Markup after an optional UTF-8 byte order mark and white space.
_MARKUP = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*(?:(?P<html><!doctype\s+html|<html|<head|<body"
                     rb"|<meta|<script|<!--)|(?P<xml><\?xml))", re.IGNORECASE)
# Bytes that never occur in text: C0 controls but tab, line feed, vertical tab, form feed,
# carriage return, DOS end of file (0x1a) and escape (ISO 2022); and DEL. Bytes from 0x80 are
# allowed: notes are written in UTF-8, Latin-1, CP949 and the like.
_NOT_TEXT = re.compile(rb"[\x00-\x08\x0e-\x19\x1c-\x1f\x7f]")


def _signature(head: bytes) -> tuple[str, str] | None:
    """(what, kind) of the format whose signature head starts with."""
    for magic, what, kind in _SIGNATURES:
        if head.startswith(magic):
            return what, kind
    if head[257:262] == b"ustar":  # POSIX and GNU tar: the magic of its first header
        return "a tar archive", _ARCHIVE
    return None


# Archives the importer unpacks (unpack.py), by their first bytes: ZIP, and tar (plain or
# compressed with gzip, bzip2 or xz; a compressed file that holds no tar is not unpacked).
_UNPACKED_FORMATS = ((b"PK\x03\x04", "ZIP"), (b"PK\x05\x06", "ZIP"), (b"\x1f\x8b", "gzip"),
                     (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


def archive_format(head: bytes) -> str | None:
    """"ZIP", "tar", "gzip", "bzip2" or "xz" for an archive to unpack; None otherwise."""
    for magic, fmt in _UNPACKED_FORMATS:
        if head.startswith(magic):
            return fmt
    return "tar" if head[257:262] == b"ustar" else None


def plainly_not_dicom(head: bytes) -> str | None:
    """What the first bytes of a file say it is, if they say it will not become DICOM:
    text, or another format's signature at offset 0. None: nothing says so (empty, zeros,
    or bytes no rule knows)."""
    if signature := _signature(head):
        return signature[0]
    if markup := _MARKUP.match(head):
        return "an HTML page" if markup["html"] else "an XML file"
    if head and not _NOT_TEXT.search(head):
        return "text"
    return None


def may_become_dicom(head: bytes) -> bool:
    """A file without the DICM magic that may only be unfinished: empty so far, shorter than
    the preamble and magic with nothing that says it is something else, or (preallocated by
    its writer) still zero where the magic will be — and neither text nor another format."""
    if plainly_not_dicom(head) is not None:
        return False
    return len(head) < PREAMBLE_AND_MAGIC or head[128:132] == b"\0\0\0\0"


# --- what was not sent, in words (the summary line, the receipt) ------------------------------

DICOMDIR = ("DICOMDIR", "DICOMDIRs")
VIEWER = ("viewer/program file", "viewer/program files")
TEXT = ("text file", "text files")
DOCUMENT = ("document or picture", "documents or pictures")
ARCHIVE = ("archive (not unpacked)", "archives (not unpacked)")  # 7-Zip, RAR, a bare .gz
UNPACKED = ("unpacked archive", "unpacked archives")  # its files went on their own (unpack.py)
EMPTY = ("empty file", "empty files")
OTHER = ("other file that is not DICOM", "other files that are not DICOM")
KINDS = (DICOMDIR, UNPACKED, VIEWER, TEXT, DOCUMENT, ARCHIVE, EMPTY, OTHER)  # the summary's order

# A CD's viewer: programs, libraries, installers, help, pages, scripts, settings, fonts, icons.
_VIEWER_EXTENSIONS = frozenset((
    "exe", "dll", "ocx", "sys", "drv", "com", "bat", "cmd", "msi", "cab", "inf", "ini", "cfg",
    "config", "manifest", "chm", "hlp", "jar", "class", "lnk", "vbs", "ps1", "sh", "app",
    "dylib", "so", "html", "htm", "xhtml", "css", "js", "xml", "xsl", "xslt", "xsd", "dtd",
    "json", "swf", "ttf", "otf", "ttc", "fon", "fnt", "woff", "woff2", "eot", "ico", "cur",
    "icns", "lic", "dat", "bin", "pak", "qm", "res",
))
_TEXT_EXTENSIONS = frozenset(("txt", "text", "log", "md", "csv", "tsv", "nfo", "me", "1st"))
_DOCUMENT_EXTENSIONS = frozenset((
    "pdf", "ps", "rtf", "doc", "docx", "odt", "xls", "xlsx", "ods", "ppt", "pptx", "jpg",
    "jpeg", "jpe", "png", "gif", "bmp", "tif", "tiff", "webp", "heic", "svg", "mp4", "avi",
    "mov", "mpg", "mpeg", "wmv", "mkv", "wav", "mp3",
))
_ARCHIVE_EXTENSIONS = frozenset(("zip", "gz", "tgz", "tar", "bz2", "xz", "7z", "rar", "iso"))
_BY_KIND = {_PROGRAM: VIEWER, _FONT: VIEWER, _ARCHIVE: ARCHIVE,
            _DOCUMENT: DOCUMENT, _PICTURE: DOCUMENT, _TEXT: TEXT}


def kind_of(name: str, head: bytes | None) -> tuple[str, str]:
    """What a file that is not sent is, for people (singular, plural): by its name first (a
    CD's autorun.inf is text, but it belongs to the viewer), then by its first bytes (None:
    they could not be read)."""
    base = name.rsplit("/", 1)[-1]
    if base.upper() == "DICOMDIR":
        return DICOMDIR
    if head == b"":
        return EMPTY
    extension = base.rsplit(".", 1)[-1].lower() if "." in base.strip(".") else ""
    for extensions, kind in ((_VIEWER_EXTENSIONS, VIEWER), (_TEXT_EXTENSIONS, TEXT),
                             (_DOCUMENT_EXTENSIONS, DOCUMENT), (_ARCHIVE_EXTENSIONS, ARCHIVE)):
        if extension in extensions:
            return kind
    if head is None:
        return OTHER
    if signature := _signature(head):
        return _BY_KIND[signature[1]]
    what = plainly_not_dicom(head)
    if what in ("an HTML page", "an XML file"):
        return VIEWER
    return TEXT if what == "text" else OTHER


def count_words(kinds: list[tuple[str, str]]) -> list[str]:
    """'12 viewer/program files', '1 text file', … in the summary's order."""
    return [f"{n} {kind[0] if n == 1 else kind[1]}"
            for kind in KINDS if (n := kinds.count(kind))]
