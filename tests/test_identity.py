"""Patient identity (issue 6) against real DCMTK, storescp and Orthanc.

What is proved here: stamping changes PatientID, PatientName and — when the name needs it —
the character set, and nothing else (element by element, from `dcmdump` of the original and
of the archived file; re-encoded text compared decoded); Korean, Latin-1 and EUC-KR text
arrives readable in a real PACS; a file whose modification failed is never sent; two people
in one folder are not merged; LOG_PATIENT_NAMES=false keeps names out of every log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from simsite.dicomgen import make_ct
from simsite.receivers import Orthanc, StoreSCP
from simsite.site import Site

ESC_KS_X_1001 = b"\x1b$)C"  # ESC $ ) C: Korean (KS X 1001) into G1, as ISO 2022 IR 149 requires

# The text every generated source carries, per element; each case encodes it its own way.
LATIN = {"PatientName": "Müller^Jörg", "ReferringPhysicianName": "Müller^Hans",
         "StudyDescription": "Thorax für Müller", "CodeMeaning": "Röntgen Thorax",
         "private": "Privat Ärger"}
KOREAN = {"PatientName": "Hong^Gildong=洪^吉洞=홍^길동",
          "ReferringPhysicianName": "Kim^Uisa=김^의사", "StudyDescription": "김 흉부 CT",
          "CodeMeaning": "흉부 촬영", "private": "사설 값"}
MIXED = {"PatientName": "김영희", "ReferringPhysicianName": "Müller^Hans",
         "StudyDescription": "Müller 김", "CodeMeaning": "흉부 Röntgen", "private": "사설 Ärger"}
PRIVATE_CREATOR = "IDENTITY TEST"
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}

# pydicom does not know the non-standard 'ISO_IR 149' either; these tests decode it themselves.
pytestmark = pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 149'")


# --- source files ---------------------------------------------------------------------------


def iso2022_kr(text: str, *, pn: bool = False) -> bytes:
    """DICOM `\\ISO 2022 IR 149` bytes: ESC $ ) C before the Korean of every value, and of every
    name component in a PN (DICOM returns to ASCII at each ^ and =)."""
    if pn:
        return b"=".join(b"^".join(iso2022_kr(part) for part in group.split("^"))
                         for group in text.split("="))
    return (b"" if text.isascii() else ESC_KS_X_1001) + text.encode("euc_kr")


def euc_kr(text: str, *, pn: bool = False) -> bytes:
    """Plain EUC-KR, no escape sequences: what modalities labelling `ISO_IR 149` often write."""
    return text.encode("euc_kr")


def encoder(codec: str) -> Callable[..., bytes]:
    return lambda text, pn=False: text.encode(codec)


def with_text(charset: str | list[str], text: dict[str, str],
              encode: Callable[..., bytes]) -> Callable[[Dataset], None]:
    """A make_ct(extra=…) that sets (0008,0005) and writes `text` as raw bytes: top level, in
    a sequence item and in a private element."""
    def extra(ds: Dataset) -> None:
        ds.add_new(0x00080005, "CS", charset)
        ds.add_new(0x00100010, "PN", encode(text["PatientName"], pn=True))
        ds.add_new(0x00080090, "PN", encode(text["ReferringPhysicianName"], pn=True))
        ds.add_new(0x00081030, "LO", encode(text["StudyDescription"]))
        item = Dataset()
        item.add_new(0x00080100, "SH", b"T-D3000 ")
        item.add_new(0x00080102, "SH", b"SRT ")
        item.add_new(0x00080104, "LO", encode(text["CodeMeaning"]))
        ds.add_new(0x00081032, "SQ", Sequence([item]))
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", encode(text["private"]))
    return extra


def make(path: Path, **kwargs: object) -> str:
    with warnings.catch_warnings():  # pydicom does not know the non-standard 'ISO_IR 149'
        warnings.simplefilter("ignore")
        return make_ct(path, rows=8, **kwargs)  # type: ignore[arg-type]


def dcmconv(source: Path, target: Path, *options: str) -> Path:
    subprocess.run(["dcmconv", *options, str(source), str(target)], check=True,
                   capture_output=True)
    return target


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def by_uid(receiver: StoreSCP) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in receiver.received_datasets()}


# --- full dumps, element by element ------------------------------------------------------------

_LINE = re.compile(r"^(?P<indent> *)\((?P<tag>[0-9a-f]{4},[0-9a-f]{4})\) (?P<vr>\S\S) "
                   r"(?P<value>.*?)\s+# *(?:\d+|u/l), *\d+ \S.*$")
_LENGTH_KIND = re.compile(r" with (?:explicit|undefined) length")
_DELIMITERS = ("fffe,e00d", "fffe,e0dd")


def full_dump(path: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """`dcmdump +L -Un +Qo`: every element, its value in full (text bytes octal-quoted, so
    byte-exact; pixel data in hex), keyed by its path such as ``(0008,1032)[0](0008,0104)``.

    Returns the "Used TransferSyntax" lines and the elements. Sequence and item lengths
    (explicit or undefined) are encoding, not content: only the item count is kept.
    """
    out = subprocess.run(["dcmdump", "+L", "-Un", "+Qo", str(path)], check=True,
                         capture_output=True).stdout.decode("ascii")
    syntaxes = [line for line in out.splitlines() if line.startswith("# Used TransferSyntax")]
    elements: dict[str, tuple[str, str]] = {}
    stack: list[str] = []
    items: dict[str, int] = {}
    for line in out.splitlines():
        match = _LINE.match(line)
        if match is None or match["tag"] in _DELIMITERS:
            continue
        level = len(match["indent"]) // 2
        stack = stack[:level]
        parent = "".join(stack)
        if match["tag"] == "fffe,e000":
            items[parent] = items.get(parent, -1) + 1
            part = f"[{items[parent]}]"
        else:
            part = f"({match['tag']})"
        elements[parent + part] = (match["vr"], _LENGTH_KIND.sub("", match["value"]))
        stack.append(part)
    return syntaxes, elements


def changes(before: Path, after: Path) -> dict[str, tuple[tuple[str, str] | None, ...]]:
    syntax_before, old = full_dump(before)
    syntax_after, new = full_dump(after)
    assert syntax_before == syntax_after, "transfer syntax changed"
    return {key: (old.get(key), new.get(key)) for key in old.keys() | new.keys()
            if old.get(key) != new.get(key)}


# DCMTK writes itself into the file meta header as the writer of the file (PS3.10: the
# implementation that wrote it) and drops the optional source AE title; group lengths follow
# the values. None of this is in the data set a PACS receives.
META_REWRITTEN = {"(0002,0000)", "(0002,0012)", "(0002,0013)", "(0002,0016)"}
IDENTITY = {"(0008,0005)", "(0010,0010)", "(0010,0020)"}


def text_value(path: Path, key: str, charset: list[str] | None = None) -> object:
    """One element decoded by pydicom (with `charset` instead of the file's own, if given)."""
    ds: Dataset = pydicom.dcmread(path)
    encodings = convert_encodings(charset or ds.get("SpecificCharacterSet") or "ISO_IR 6")
    steps = re.findall(r"\(([0-9a-f]{4}),([0-9a-f]{4})\)|\[(\d+)\]", key)
    for (group, element, _), (_, _, index) in zip(steps, steps[1:], strict=False):
        if index:
            ds = ds[int(group + element, 16)].value[int(index)]
    group, element, _ = steps[-1]
    raw = ds.get_item(int(group + element, 16))
    elem = convert_raw_data_element(raw, encoding=encodings) if isinstance(
        raw, RawDataElement) else raw
    assert isinstance(elem, DataElement)
    value = elem.value
    return [str(v) for v in value] if isinstance(value, MultiValue) else str(value)


def assert_only_identity_changed(original: Path, archived: Path, *, converted_from: str | None
                                 ) -> set[str]:
    """Only (0008,0005), PatientName, PatientID and DCMTK's writer marks differ, plus — for a
    file converted to UTF-8 — text elements whose bytes changed but whose text did not.
    Returns the keys of the re-encoded elements."""
    reencoded = set()
    source_charset = (["", "ISO 2022 IR 149"] if converted_from in ("ISO_IR 149",
                                                                       "ISO 2022 IR 149")
                      else None)
    assert_original_identity_kept(original, archived, source_charset)
    for key, (old, new) in changes(original, archived).items():
        if key in IDENTITY or key in META_REWRITTEN or re.fullmatch(r".*\([0-9a-f]{4},0000\)",
                                                                    key):
            continue
        if key.startswith("(0400,0561)"):  # the provenance item: checked above
            continue
        assert converted_from is not None, f"{original.name}: {key} changed: {old} -> {new}"
        if key.endswith("(0008,0005)"):  # an item's own character set, converted with it
            continue
        assert old is not None and new is not None and old[0] == new[0] in TEXT_VRS, (
            f"{original.name}: {key} changed beyond re-encoding: {old} -> {new}")
        assert text_value(original, key, source_charset) == text_value(archived, key), key
        reencoded.add(key)
    return reencoded


def assert_original_identity_kept(original: Path, archived: Path,
                                  source_charset: list[str] | None) -> None:
    """The last Original Attributes Sequence item holds exactly the original values of the
    identity attributes that changed, as text in the archived file's character set (the
    original read in source_charset where its own label is not one DICOM defines)."""
    before, after = pydicom.dcmread(original), pydicom.dcmread(archived)
    items = after.get("OriginalAttributesSequence") or []
    assert len(items) == len(before.get("OriginalAttributesSequence") or []) + 1, original.name
    item = items[-1]
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem.startswith("dicom-importer")
    (kept,) = item.ModifiedAttributesSequence
    for keyword in ("PatientID", "PatientName"):
        tag = "(0010,0020)" if keyword == "PatientID" else "(0010,0010)"
        old = text_value(original, tag, source_charset) if keyword in before else ""
        if old == str(after.get(keyword) or ""):
            assert keyword not in kept, (original.name, keyword)
        else:
            assert str(kept.get(keyword) or "") == old, (original.name, keyword)


# --- (a) nothing else changes --------------------------------------------------------------


def test_only_the_identity_and_the_character_set_change(site: Site, storescp: StoreSCP,
                                                        tmp_path: Path) -> None:
    """Every kind of source file, archived after a real run, against its original."""
    site.use(storescp)
    src = tmp_path / "originals"
    korean = {  # file -> the character set it had (None: ASCII text, no conversion needed)
        "ascii.dcm": None, "no-patient.dcm": None, "implicit.dcm": None, "big-endian.dcm": None,
        "deflated.dcm": None, "utf8.dcm": None,
        "latin1.dcm": "ISO_IR 100", "latin1-big-endian.dcm": "ISO_IR 100",
        "iso2022-ir149.dcm": "\\ISO 2022 IR 149", "iso-ir-149.dcm": "ISO_IR 149",
        "iso2022-ir149-as-value-1.dcm": "ISO 2022 IR 149",
    }
    make(src / "ascii.dcm")
    make(src / "no-patient.dcm", omit_patient_tags=True)
    shutil.copyfile(get_testdata_file("MR_small_implicit.dcm"), src / "implicit.dcm")
    shutil.copyfile(get_testdata_file("MR_small_bigendian.dcm"), src / "big-endian.dcm")
    make(tmp_path / "plain.dcm")
    dcmconv(tmp_path / "plain.dcm", src / "deflated.dcm", "+td")
    make(src / "utf8.dcm", extra=with_text("ISO_IR 192", MIXED, encoder("utf-8")))
    make(src / "latin1.dcm", extra=with_text("ISO_IR 100", LATIN, encoder("latin-1")))
    make(tmp_path / "latin1-le.dcm", extra=with_text("ISO_IR 100", LATIN, encoder("latin-1")))
    dcmconv(tmp_path / "latin1-le.dcm", src / "latin1-big-endian.dcm", "+tb")
    make(src / "iso2022-ir149.dcm", extra=with_text(["", "ISO 2022 IR 149"], KOREAN, iso2022_kr))
    make(src / "iso-ir-149.dcm", extra=with_text("ISO_IR 149", KOREAN, iso2022_kr))
    make(src / "iso2022-ir149-as-value-1.dcm",
         extra=with_text("ISO 2022 IR 149", KOREAN, iso2022_kr))
    # An ASCII name needs no character set: other text stays in its own, byte for byte.
    ascii_folder = {"ascii.dcm": None, "latin1.dcm": None, "iso-ir-149-euc-kr.dcm": None}
    # Its own images (the same study in two patients' folders would be held: claims.py).
    own = tmp_path / "own"
    make(own / "ascii.dcm")
    make(own / "latin1.dcm", extra=with_text("ISO_IR 100", LATIN, encoder("latin-1")))
    make(own / "iso-ir-149-euc-kr.dcm", extra=with_text("ISO_IR 149", KOREAN, euc_kr))
    for folder, files, origin in (("#4321-홍길동", korean, src),
                                  ("#4322-Doe^John", ascii_folder, own)):
        for name in files:
            (site.import_dir / folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin / name, site.import_dir / folder / name)

    result = site.run()

    assert result.returncode == 0, result.stderr
    archived = site.archived()
    assert len(archived) == len(korean) + len(ascii_folder) and site.failed() == {}
    for folder, files, identity, origin in (
            ("#4321-홍길동", korean, ("4321", "홍길동", "ISO_IR 192"), src),
            ("#4322-Doe^John", ascii_folder, ("4322", "Doe^John", None), own)):
        for name, charset in files.items():
            original, done = origin / name, archived[f"{folder}/{name}"]
            reencoded = assert_only_identity_changed(original, done, converted_from=charset)
            ds, before = pydicom.dcmread(done), pydicom.dcmread(original)
            assert (ds.PatientID, str(ds.PatientName)) == identity[:2], name
            assert ds.get("SpecificCharacterSet") == (identity[2] or before.get(
                "SpecificCharacterSet")), name
            assert ds.PixelData == before.PixelData, name
            assert ds.SOPInstanceUID == before.SOPInstanceUID, name
            assert ds.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID, name
            if charset is not None:  # the converted ones really were re-encoded, text intact
                assert {"(0008,0090)", "(0008,1030)", "(0008,1032)[0](0008,0104)",
                        "(0011,1001)"} <= reencoded, (name, reencoded)
    # Untouched ISO_IR 149 text in an ASCII-named folder: its bytes are exactly the same.
    kept = pydicom.dcmread(archived["#4322-Doe^John/iso-ir-149-euc-kr.dcm"])
    assert kept.SpecificCharacterSet == "ISO_IR 149"
    assert kept.get_item(0x00081030).value == euc_kr(KOREAN["StudyDescription"])
    assert len(storescp.received()) >= 1


def test_nonstandard_iso_ir_149_is_relabelled_or_quarantined(site: Site, storescp: StoreSCP,
                                                             tmp_path: Path) -> None:
    """'ISO_IR 149' (not a DICOM term; dcmconv refuses it) is tried as '\\ISO 2022 IR 149':
    text with the escape sequences DICOM requires converts exactly; plain EUC-KR makes
    dcmconv fail, and the file is quarantined untouched with a reason, never sent."""
    site.use(storescp)
    folder = site.import_dir / "#61-홍길동"
    good = make(folder / "escaped.dcm", extra=with_text("ISO_IR 149", KOREAN, iso2022_kr))
    plain = make(folder / "plain-euc-kr.dcm", extra=with_text("ISO_IR 149", KOREAN, euc_kr))
    before = sha(folder / "plain-euc-kr.dcm")

    result = site.run()

    assert result.returncode == 1, "a quarantined file is not a clean run"
    received = by_uid(storescp)
    assert set(received) == {good} and plain not in received
    ds = received[good]
    assert (ds.PatientID, str(ds.PatientName), ds.SpecificCharacterSet) == (
        "61", "홍길동", "ISO_IR 192")
    assert str(ds.ReferringPhysicianName) == KOREAN["ReferringPhysicianName"]
    assert ds.StudyDescription == KOREAN["StudyDescription"]
    assert ds.ProcedureCodeSequence[0].CodeMeaning == KOREAN["CodeMeaning"]
    quarantined = site.failed()["#61-홍길동/plain-euc-kr.dcm"]
    assert sha(quarantined) == before, "quarantined exactly as it came"
    reason = quarantined.with_name("plain-euc-kr.dcm.reason.txt").read_text()
    assert "cannot convert character set 'ISO_IR 149'" in reason
    assert "\\\\ISO 2022 IR 149" in reason and "ESC $ ) C" in reason
    assert "Invalid or incomplete multibyte" in reason  # dcmconv's own words
    assert "quarantined" in result.stderr and site.remaining() == []


# --- (a) pydicom's real-world files ----------------------------------------------------------


def test_pydicom_sample_files_are_delivered_right_or_kept_with_a_reason(
        site: Site, tmp_path: Path) -> None:
    """~190 real files (compressed, big-endian, implicit, RT, SR, DICOMDIRs, truncated, every
    character set) in one Korean-named folder: none sent under a wrong identity, none lost."""
    root = Path(pydicom.data.__file__).parent
    sources = {os.path.relpath(f, root).replace(os.sep, "__"): Path(f)
               for f in [*get_testdata_files(), *get_charset_files()] if os.path.isfile(f)}
    assert len(sources) > 150, "pydicom's bundled files are available offline"
    folder = site.import_dir / "#12345-홍길동"
    folder.mkdir(parents=True)
    for name, path in sources.items():
        shutil.copyfile(path, folder / name)
    site.env["MIXED_PATIENTS"] = "allow"  # they are many people: not the point here
    with StoreSCP(tmp_path / "received", extra_args=["+xa", "+uf"]) as receiver:
        site.use(receiver)
        result = site.run(timeout=300)
        received = receiver.received_datasets()

    archived = {Path(k).name: v for k, v in site.archived().items()}
    failed = {Path(k).name: v for k, v in site.failed().items()}
    remaining = {Path(p).name for p in site.remaining()}
    # None lost: each file is archived, quarantined or still waiting in the import folder.
    assert set(archived) | set(failed) | remaining == set(sources)
    assert not (set(archived) & set(failed)) and not (set(archived) & remaining)
    # None sent under a wrong identity.
    assert received, result.stderr
    for ds in received:
        assert (ds.PatientID, str(ds.PatientName), ds.SpecificCharacterSet) == (
            "12345", "홍길동", "ISO_IR 192")
    # Each quarantined file has a reason; each waiting one was named with why.
    for name, path in failed.items():
        assert path.with_name(path.name + ".reason.txt").read_text().strip(), name
    logged = "\n".join(r["message"] for r in site.log_records())  # every file, there
    for name in remaining:  # waiting for a retry, or for the images of its folder
        assert (f"{name}: left for retry:" in logged
                or f"Not a DICOM file: #12345-홍길동/{name} (" in logged
                or "DICOMDIR" in name), name
    # DICOMDIRs are recognised by their SOP class whatever their name, and never sent.
    sent = [arg for r in site.log_records() if r.get("tool") == "storescu" for arg in r["argv"]]
    assert sent and not [arg for arg in sent if "DICOMDIR" in arg]
    # Archived DICOM files carry the identity (the rest are not DICOM or DICOMDIRs).
    magic = subprocess.run(["dcmftest", *map(str, archived.values())], capture_output=True,
                           text=True).stdout
    dicom = [Path(line[5:]) for line in magic.splitlines() if line.startswith("yes: ")]
    for path in dicom:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
            continue  # a DICOMDIR: archived, never sent (whatever it is called)
        assert (ds.PatientID, str(ds.PatientName)) == ("12345", "홍길동"), path.name
    # Named cases.
    assert "charset_files__chrI2.dcm" in archived  # \ISO 2022 IR 149, converted
    chr_i2 = pydicom.dcmread(archived["charset_files__chrI2.dcm"])
    assert (chr_i2.SpecificCharacterSet, str(chr_i2.PatientName)) == ("ISO_IR 192", "홍길동")
    for name in ("test_files__dicomdirtests__DICOMDIR", "test_files__rtplan.dump"):
        assert name not in failed, name  # unsent, archived once the folder's images are
    assert "test_files__rtdose_rle.dcm" in archived  # UN patient tags: dcmconv +uc first
    for name, why in (("test_files__MR_truncated.dcm", "DCMTK cannot read this file"),
                      ("charset_files__chrH31.dcm", "'ISO 2022 IR 87'")):
        assert why in failed[name].with_name(name + ".reason.txt").read_text(), name


# --- (b) a real PACS: Orthanc --------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc(tcp_nodelay=True) as server:
        yield server


def orthanc_patient(orthanc: Orthanc, patient_id: str) -> dict:
    (patient,) = [p for p in orthanc.patients() if p["MainDicomTags"]["PatientID"] == patient_id]
    return patient


def orthanc_instance_tags(orthanc: Orthanc, patient_id: str) -> list[dict]:
    return [orthanc.tags(i["ID"]) for i in orthanc.instances()
            if orthanc.tags(i["ID"]).get("PatientID") == patient_id]


def test_korean_name_is_readable_in_orthanc(site: Site, orthanc: Orthanc) -> None:
    site.use(orthanc)  # type: ignore[arg-type]
    for i in range(3):
        make(site.import_dir / "#12345-홍길동" / f"{i}.dcm", patient_name="Old^Name")

    result = site.run()

    assert result.returncode == 0, result.stderr
    patient = orthanc_patient(orthanc, "12345")
    assert patient["MainDicomTags"]["PatientName"] == "홍길동"
    assert orthanc.get(f"/patients/{patient['ID']}")["MainDicomTags"]["PatientName"] == "홍길동"
    tags = orthanc_instance_tags(orthanc, "12345")
    assert len(tags) == 3 and {t["SpecificCharacterSet"] for t in tags} == {"ISO_IR 192"}


@pytest.mark.parametrize(("patient_id", "charset", "text", "encode"), [
    ("20001", "ISO_IR 100", LATIN, encoder("latin-1")),
    ("20002", ["", "ISO 2022 IR 149"], KOREAN, iso2022_kr),
    ("20003", "ISO_IR 149", KOREAN, iso2022_kr),
    ("20004", "ISO_IR 192", MIXED, encoder("utf-8")),
], ids=["latin1", "iso2022-ir149", "iso-ir-149", "utf8"])
def test_other_character_sets_under_a_korean_name_decode_right(
        site: Site, orthanc: Orthanc, patient_id: str, charset: str | list[str],
        text: dict[str, str], encode: Callable[..., bytes]) -> None:
    site.use(orthanc)  # type: ignore[arg-type]
    folder = f"#{patient_id}-김영희"
    make(site.import_dir / folder / "a.dcm", extra=with_text(charset, text, encode))

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert orthanc_patient(orthanc, patient_id)["MainDicomTags"]["PatientName"] == "김영희"
    (tags,) = orthanc_instance_tags(orthanc, patient_id)
    assert tags["SpecificCharacterSet"] == "ISO_IR 192"
    assert tags["ReferringPhysicianName"] == text["ReferringPhysicianName"]
    assert tags["StudyDescription"] == text["StudyDescription"]
    assert tags["ProcedureCodeSequence"][0]["CodeMeaning"] == text["CodeMeaning"]
    ds = pydicom.dcmread(site.archived()[f"{folder}/a.dcm"])
    assert str(ds.PatientName) == "김영희"
    assert str(ds.ReferringPhysicianName) == text["ReferringPhysicianName"]
    assert ds.StudyDescription == text["StudyDescription"]
    assert ds.ProcedureCodeSequence[0].CodeMeaning == text["CodeMeaning"]
    assert ds.get_private_item(0x0011, 0x01, PRIVATE_CREATOR).value == text["private"]


# --- (c) a file whose modification fails is never sent --------------------------------------------


def test_file_that_cannot_be_stamped_is_quarantined_not_sent(site: Site,
                                                            storescp: StoreSCP) -> None:
    """dcmodify fails on files DCMTK reads fine, in one batch with good files.
    PatientName encoded as a sequence: dcmodify says "Cannot put value into non-leaf
    elements", exits 1 for the whole batch and saves the file with only the new PatientID;
    only the verifying dump tells which files carry the identity. pydicom's real
    rtdose_rle.dcm has PatientID with VR UN: dcmodify alone takes "40" for a byte (writes
    0x40) and says nothing; it is given its real VRs first (dcmconv +uc) and goes through."""
    site.use(storescp)
    folder = site.import_dir / "#40-Fail^Modify"
    good = {make(folder / "good1.dcm"), make(folder / "good2.dcm")}

    def name_as_sequence(ds: Dataset) -> None:
        del ds.PatientName
        item = Dataset()
        item.CodeValue = "X"
        ds.add_new(0x00100010, "SQ", Sequence([item]))

    bad = {"name-sequence.dcm": make(folder / "name-sequence.dcm", extra=name_as_sequence)}
    shutil.copyfile(get_testdata_file("rtdose_rle.dcm"), folder / "rtdose_rle.dcm")
    good.add(pydicom.dcmread(folder / "rtdose_rle.dcm").SOPInstanceUID)
    before = {name: sha(folder / name) for name in bad}

    result = site.run()

    assert result.returncode == 1
    received = by_uid(storescp)
    assert set(received) == good, "only the stamped and verified files were sent"
    assert all((ds.PatientID, str(ds.PatientName)) == ("40", "Fail^Modify")
               for ds in received.values())
    failed = site.failed()
    assert set(failed) == {f"#40-Fail^Modify/{name}" for name in bad}
    reasons = {}
    for name in bad:
        path = failed[f"#40-Fail^Modify/{name}"]
        assert sha(path) == before[name], f"{name}: quarantined as it came, never half-modified"
        reasons[name] = path.with_name(name + ".reason.txt").read_text()
        assert "the identity could not be written" in reasons[name], reasons[name]
    assert "Cannot put value into non-leaf elements" in reasons["name-sequence.dcm"]
    modify = [r for r in site.log_records() if r.get("tool") == "dcmodify"]
    # in place one batched call per original identity (the failing file has no PatientName:
    # its own; the good ones share one whose code names no file), one on the UN file's copy
    assert sorted(r["exit_code"] for r in modify) == [0, 0, 1]
    assert sorted(site.archived()) == ["#40-Fail^Modify/good1.dcm", "#40-Fail^Modify/good2.dcm",
                                       "#40-Fail^Modify/rtdose_rle.dcm"]
    assert site.remaining() == []


# --- (d) two people in one folder ----------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def warnings_about(stderr: str, folder: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[WARN]" in line and folder in line]


def test_two_people_are_held_untouched_then_sent_when_allowed(site: Site,
                                                              storescp: StoreSCP) -> None:
    site.use(storescp)
    births = site.import_dir / "#30-Mixed^Birth"
    make(births / "a.dcm", patient_id="A1", birth_date="19800101", sex="F")
    make(births / "b.dcm", patient_id="A1", birth_date="19900202", sex="F")
    sexes = site.import_dir / "#31-Mixed^Sex"
    make(sexes / "a.dcm", patient_id="B1", birth_date="19700101", sex="M")
    make(sexes / "b.dcm", patient_id="B1", birth_date="19700101", sex="F")
    ids = site.import_dir / "#32-Other^Ids"  # one person, CDs from two hospitals
    id_uids = {make(ids / "a.dcm", patient_id="HOSP-A-1", birth_date="19600101", sex="M"),
               make(ids / "b.dcm", patient_id="HOSP-B-9", birth_date="19600101", sex="M"),
               make(ids / "c.dcm", patient_id="HOSP-B-9", birth_date="", sex="")}
    held_before = {name: tree_digest(site.import_dir / name)
                   for name in ("#30-Mixed^Birth", "#31-Mixed^Sex")}

    held = site.run()  # MIXED_PATIENTS=hold is the default

    assert held.returncode == 1, "a held folder is not a clean run"
    for name, values in (("#30-Mixed^Birth", ("19800101", "19900202")),
                         ("#31-Mixed^Sex", ("'F'", "'M'"))):
        assert tree_digest(site.import_dir / name) == held_before[name], "held untouched"
        (warning,) = [w for w in warnings_about(held.stderr, name) if "two patients" in w]
        assert all(v in warning for v in values) and "MIXED_PATIENTS=hold" in warning
    received = by_uid(storescp)
    assert set(received) == id_uids, "only the folder with differing IDs alone was sent"
    assert {ds.PatientID for ds in received.values()} == {"32"}
    (ids_warning,) = warnings_about(held.stderr, "#32-Other^Ids")
    assert "different original patient IDs" in ids_warning
    assert [p for p in site.archived() if p.startswith("#32")] and site.failed() == {}

    # warn: sent, with the warning (the sex folder waits outside, for `allow` below).
    shutil.move(site.import_dir / "#31-Mixed^Sex", site.root / "parked")
    warned = site.run(env={**site.env, "MIXED_PATIENTS": "warn"})
    assert warned.returncode == 0, warned.stderr
    (warning,) = [w for w in warnings_about(warned.stderr, "#30-Mixed^Birth")
                  if "two patients" in w]
    assert "sending anyway (MIXED_PATIENTS=warn)" in warning
    shutil.move(site.root / "parked", site.import_dir / "#31-Mixed^Sex")
    allowed = site.run(env={**site.env, "MIXED_PATIENTS": "allow"})
    assert allowed.returncode == 0, allowed.stderr
    assert not [w for w in warnings_about(allowed.stderr, "#31-Mixed^Sex")
                if "two patients" in w]
    received = by_uid(storescp)
    assert {ds.PatientID for ds in received.values()} == {"30", "31", "32"}
    assert len(received) == 7 and site.remaining() == []


# --- (e) LOG_PATIENT_NAMES=false -----------------------------------------------------------------


def test_patient_names_stay_out_of_every_log(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    site.env["LOG_PATIENT_NAMES"] = "false"
    korean = site.import_dir / "#50-홍길동"
    make(korean / "ascii.dcm", patient_name="Old^Name")
    make(korean / "latin1.dcm", extra=with_text("ISO_IR 100", LATIN, encoder("latin-1")))
    make(korean / "plain-euc-kr.dcm", extra=with_text("ISO_IR 149", KOREAN, euc_kr))

    def name_as_sequence(ds: Dataset) -> None:
        del ds.PatientName
        ds.add_new(0x00100010, "SQ", Sequence([Dataset()]))

    make(korean / "name-sequence.dcm", extra=name_as_sequence)
    nfd = unicodedata.normalize("NFD", "#51-김영희")  # as a macOS share delivers it
    make(site.import_dir / nfd / "a.dcm", patient_name="Kim^Original")

    result = site.run("run-once", "-v")

    assert result.returncode == 1, result.stderr  # two files quarantined
    assert {str(ds.PatientName) for ds in storescp.received_datasets()} == {"홍길동", "김영희"}
    logs = {p.name: p.read_text(encoding="utf-8") for p in site.log_dir.iterdir()}
    assert len(logs) == 2  # log.log and this batch's
    secrets = ["홍길동", "김영희", "Old^Name", "Kim^Original", "Müller^Jörg", "Hong^Gildong"]
    for secret in secrets:
        for form in {unicodedata.normalize("NFC", secret), unicodedata.normalize("NFD", secret)}:
            assert form not in result.stderr and form not in result.stdout, secret
            for name, text in logs.items():
                assert form not in text, f"{secret} in {name}"
    # What is left is still useful: the folder by its ID, the tools, the masked values.
    assert "#50-***" in result.stderr and "ID 50 / name ***" in result.stderr
    tools = [r for r in site.log_records() if "tool" in r]
    modify = [r for r in tools if r["tool"] == "dcmodify" and "(0010,0010)=***" in r["argv"]]
    # Batched: per folder and original identity one call in place (#50: Old^Name, and the
    # name-as-sequence file; #51), plus one for #50's converted working copies.
    assert len(modify) == 4
    # dcmdump's values are data for the importer: its records count them, not repeat them.
    dumps = [r for r in tools if r["tool"] == "dcmdump" and "/dev/null" not in r["argv"]]
    assert dumps and all(r["data_lines"] > 0 for r in dumps)  # (not the dictionary probe)
    assert not [line for r in dumps for line in r["output"] if line.lstrip().startswith("(")]
    assert any("PatientName is not the folder's" in line for line in result.stderr.splitlines())
