"""Folder name -> identity: what matches, what must never match."""

from __future__ import annotations

import unicodedata

import pytest

from importer.folders import (
    DEFAULT_PATTERN,
    Patient,
    PatternError,
    compile_pattern,
    display,
    parse_folder_name,
)

PATTERN = compile_pattern(DEFAULT_PATTERN)


@pytest.mark.parametrize(
    ("folder", "patient"),
    [
        ("#12345-Doe^John", Patient("12345", "Doe^John")),
        ("#1-ABC123", Patient("1", "ABC123")),
        ("#12345-홍길동", Patient("12345", "홍길동")),
        ("#7-Hong^Gildong=洪^吉洞=홍^길동", Patient("7", "Hong^Gildong=洪^吉洞=홍^길동")),
        ("#8-Müller^Jörg", Patient("8", "Müller^Jörg")),
        ("#9-Doe#2", Patient("9", "Doe#2")),  # the old alphabet allowed '#'
        ("#10-" + "a" * 64, Patient("10", "a" * 64)),
        ("#" + "1" * 64 + "-X", Patient("1" * 64, "X")),
    ],
)
def test_valid_names_give_the_identity(folder: str, patient: Patient) -> None:
    assert parse_folder_name(folder, PATTERN) == patient


def test_macos_nfd_names_are_normalised_to_nfc() -> None:
    nfd = unicodedata.normalize("NFD", "#8-Müller^Jörg")
    assert nfd != "#8-Müller^Jörg"
    assert parse_folder_name(nfd, PATTERN) == Patient("8", "Müller^Jörg")
    hangul = unicodedata.normalize("NFD", "#5-홍길동")
    assert parse_folder_name(hangul, PATTERN) == Patient("5", "홍길동")


@pytest.mark.parametrize(
    "folder",
    [
        "12345-Doe",  # no '#'
        "#12345Doe",  # no '-'
        "#abc-Doe",  # id not numeric
        "#-Doe",
        "#12345-",
        "#12345-Doe John",  # space
        "#12345-Doe_John",  # underscore is \w but not a name character
        "#12345-Doe.dcm",
        "#12345-^^",  # no letter at all
        "#1-$(rm -rf ~)",
        "#1-`id`",
        "#1-a;b",
        "#1-a'b",
        '#1-a"b',
        "#1-a|b",
        "#12345-Doe\n",  # trailing newline
        "#12345-Do\ne",
        "#12345-Doe\t",
        "#12345-Doe\x00",
        "#12345-Doe\u200b",  # zero-width space (format character)
        "#12345-Doe\\Smith",  # DICOM value separator
        "#12345-a/b",
        "#12345-\udcff\udcfe",  # undecodable bytes from the file system
        "#10-" + "a" * 65,  # PN group over 64 characters
        "#10-" + "a" * 64 + "=" + "b" * 65,
        "#10-a=b=c=d",  # more than three PN groups
        "#" + "1" * 65 + "-X",  # LO over 64 characters
    ],
)
def test_invalid_names_do_not_match(folder: str) -> None:
    assert parse_folder_name(folder, PATTERN) is None


def test_custom_pattern_needs_named_groups() -> None:
    custom = compile_pattern(r"^(?P<id>\d+)_(?P<name>\w+)$")
    assert parse_folder_name("42_Smith", custom) == Patient("42", "Smith")
    with pytest.raises(PatternError, match="named groups"):
        compile_pattern(r"^#(\d+)-(\w+)$")
    with pytest.raises(PatternError, match="not a valid regular expression"):
        compile_pattern(r"^#(?P<id>\d+")


def test_custom_pattern_still_enforces_vr_limits() -> None:
    loose = compile_pattern(r"^(?P<id>.+)-(?P<name>.+)$")
    assert parse_folder_name("1-" + "x" * 65, loose) is None
    assert parse_folder_name("1-a\nb", loose) is None


def test_display_escapes_what_would_break_a_log_line() -> None:
    assert display("#1-a\nb") == "#1-a\\nb"
    assert display("#1-\udcff") == "#1-\\xff"
    assert display("#12345-홍길동") == "#12345-홍길동"


def test_patient_is_ascii() -> None:
    assert Patient("1", "Doe^John").is_ascii()
    assert not Patient("1", "홍길동").is_ascii()
