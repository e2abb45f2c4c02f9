"""sniff.py: a file that may still become DICOM against one that is plainly something else,
and what a file that is not sent is called in the summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from importer import sniff
from simsite.dicomgen import make_ct

PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"\0" * 46 + b"\x80\0\0\0"
PE += b"\0" * (128 - len(PE)) + b"PE\0\0" + b"\x4c\x01" + b"\0" * 100
TTF = b"\x00\x01\x00\x00\x00\x0c\x00\x80\x00\x03\x00\x40" + b"cmap" + b"\0" * 200


@pytest.fixture(scope="module")
def ct_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ct") / "ct.dcm"
    make_ct(path, rows=16)
    return path.read_bytes()


def test_every_prefix_of_a_real_dicom_file_short_of_its_magic_may_become_dicom(
        ct_bytes: bytes) -> None:
    """A copy stalled anywhere in the preamble or the magic is never taken for something
    else (a longer one has its DICM magic and never gets here)."""
    assert ct_bytes[128:132] == b"DICM"
    for n in range(132):
        assert sniff.may_become_dicom(ct_bytes[:n]), n
        assert sniff.plainly_not_dicom(ct_bytes[:n]) is None, n


@pytest.mark.parametrize("head", [
    b"",  # created, nothing written yet
    b"\0" * 40,  # the preamble so far
    b"\0" * sniff.HEAD_BYTES,  # preallocated: zero where the magic will be
    b"\0" * 128 + b"DI",  # stalled inside the magic
    b"II*\x00" + b"\0" * 60,  # a DICOM-TIFF dual file's preamble, so far
    b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",  # a data set without preamble, cut short
    b"\x01\x02\x03\x04\x05",  # nothing says what it is
])
def test_may_still_become_dicom(head: bytes) -> None:
    assert sniff.may_become_dicom(head)


@pytest.mark.parametrize(("head", "what"), [
    (b"see report\n", "text"),  # the 11-byte notes.txt of issue 23
    (b"[autorun]\r\nopen=viewer.exe\r\nicon=viewer.ico\r\n", "text"),
    ("환자가 CD를 가져옴\n".encode(), "text"),  # UTF-8
    ("환자가 CD를 가져옴\r\n".encode("cp949"), "text"),  # Korean Windows Notepad
    ("Über den Befund\n".encode("latin-1"), "text"),
    ("notes\r\n".encode("utf-16"), "UTF-16 text"),
    (b"<!DOCTYPE html>\n<html><body>viewer</body></html>", "an HTML page"),
    (b"\xef\xbb\xbf<html lang=en>", "an HTML page"),
    (b"<?xml version='1.0'?><config/>", "an XML file"),
    (PE, "a Windows program or library"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 200, "a Unix program or library"),
    (TTF, "a TrueType font"),
    (b"OTTO\x00\x0b" + b"\0" * 200, "an OpenType font"),
    (b"wOFF\x00\x01\x00\x00", "a web font"),
    (b"\x00\x00\x01\x00\x01\x00\x20\x20" + b"\0" * 200, "an icon"),
    (b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + b"\0" * 200, "a ZIP archive"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"\0" * 200, "a PDF document"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 200, "a JPEG picture"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\0" * 200, "a PNG picture"),
    (b"GIF89a\x01\x00\x01\x00" + b"\0" * 200, "a GIF picture"),
    (b"MSCF\0\0\0\0" + b"\0" * 200, "a Windows cabinet"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 200, "an installer or Office document"),
])
def test_plainly_not_dicom(head: bytes, what: str) -> None:
    """Text, or another format's signature at offset 0 (even with zeros where the magic
    would go): settled, such a file is archived unsent at once instead of waiting."""
    assert sniff.plainly_not_dicom(head) == what
    assert not sniff.may_become_dicom(head)
    if not what.endswith("text"):  # (text followed by zeros is no longer text)
        assert not sniff.may_become_dicom(head[:131] + b"\0" * 400)


def test_binary_with_something_at_the_magic_is_not_dicom_as_before() -> None:
    """Unknown bytes that are neither zero nor DICM where the magic goes: not DICOM (a raw
    data set that DCMTK reads never gets here)."""
    assert not sniff.may_become_dicom(b"\x01" * 128 + b"ABCD" + b"\x02" * 10)


@pytest.mark.parametrize(("name", "head", "kind"), [
    ("DICOMDIR", b"\0" * 128 + b"DICM", sniff.DICOMDIR),
    ("CD/dicomdir", b"\x01", sniff.DICOMDIR),
    ("VIEWER/viewer.exe", PE, sniff.VIEWER),
    ("VIEWER/dcmtk.DLL", PE, sniff.VIEWER),
    ("autorun.inf", b"[autorun]\r\n", sniff.VIEWER),
    ("index.html", b"<html>", sniff.VIEWER),
    ("VIEWER/fonts/arial.ttf", TTF, sniff.VIEWER),
    ("VIEWER/setup", PE, sniff.VIEWER),  # by its bytes when its name says nothing
    ("VIEWER/page", b"<!doctype html>", sniff.VIEWER),
    ("notes.txt", b"see report\n", sniff.TEXT),
    ("README", b"Open viewer.exe to see the images.\n", sniff.TEXT),
    ("report.pdf", b"%PDF-1.4", sniff.DOCUMENT),
    ("screenshot", b"\x89PNG\r\n\x1a\n", sniff.DOCUMENT),
    ("study.zip", b"PK\x03\x04", sniff.ARCHIVE),
    ("notes.txt", b"", sniff.EMPTY),
    ("blob", b"\x01\x02\x00\x00\x05", sniff.OTHER),
    ("unreadable", None, sniff.OTHER),
])
def test_kind_of(name: str, head: bytes | None, kind: tuple[str, str]) -> None:
    assert sniff.kind_of(name, head) == kind


@pytest.mark.parametrize(("head", "fmt"), [
    (b"PK\x03\x04\x14\x00", "ZIP"),
    (b"PK\x05\x06" + b"\0" * 18, "ZIP"),  # an empty ZIP
    (b"\x1f\x8b\x08\x00", "gzip"),
    (b"BZh91AY", "bzip2"),
    (b"\xfd7zXZ\x00\x00", "xz"),
    (b"CT/IM1.dcm".ljust(257, b"\0") + b"ustar\x0000", "tar"),
    (b"7z\xbc\xaf\x27\x1c", None),  # 7-Zip and RAR: not unpacked
    (b"Rar!\x1a\x07\x00", None),
    (b"\0" * 128 + b"DICM", None),
    (b"", None),
])
def test_archive_format(head: bytes, fmt: str | None) -> None:
    assert sniff.archive_format(head) == fmt


def test_a_tar_is_plainly_not_dicom() -> None:
    head = b"CT/IM1.dcm".ljust(124, b"\0") + b"00000001000\0" + b"\0" * 121 + b"ustar\x0000"
    assert sniff.plainly_not_dicom(head) == "a tar archive"
    assert sniff.kind_of("bundle", head) == sniff.ARCHIVE


def test_count_words_in_the_summary_order() -> None:
    kinds = [sniff.TEXT, *[sniff.VIEWER] * 12, sniff.DICOMDIR]
    assert sniff.count_words(kinds) == [
        "1 DICOMDIR", "12 viewer/program files", "1 text file"]
    assert sniff.count_words([sniff.DICOMDIR, sniff.DICOMDIR, sniff.EMPTY]) == [
        "2 DICOMDIRs", "1 empty file"]
    assert sniff.count_words([]) == []


def test_read_head_of_a_missing_file_is_none(tmp_path: Path) -> None:
    from importer.share import read_head
    assert read_head(str(tmp_path / "gone"), 10) is None
    (tmp_path / "five").write_bytes(b"12345")
    assert read_head(str(tmp_path / "five"), 3) == b"123"
