"""Every file reaches a verdict: archived, quarantined with a reason, held, or left for a
named reason, within MAX_ATTEMPTS runs against PACS that are up (issue #12).

The decision itself is a pure function (importer.verdict.decide), tested on a table; the
rest runs the real CLI against Orthanc as Debian ships it, Orthanc that answers C-FIND,
and storescp with its default uncompressed-only transfer syntaxes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from importer.journal import Delivery
from importer.verdict import Fate, Target, decide
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import Orthanc, StoreSCP, free_port
from simsite.site import Site

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"

# --- the pure decision ----------------------------------------------------------------------

UP = Target("PACS@h:1", required=True, needs_c_find=True)
NO_FIND = Target("STORESCP@h:2", required=True, needs_c_find=False)
OPTIONAL = Target("RESEARCH@h:3", required=False, needs_c_find=True)


@pytest.mark.parametrize(("states", "fate", "says"), [
    # delivered and listed everywhere required
    ([(UP, Delivery(delivered=True, verified=True))], Fate.ARCHIVE, ""),
    # no C-FIND needed there: the C-STORE answer is the verdict
    ([(NO_FIND, Delivery(delivered=True))], Fate.ARCHIVE, ""),
    # an optional destination never holds a file back
    ([(UP, Delivery(delivered=True, verified=True)), (OPTIONAL, Delivery())], Fate.ARCHIVE, ""),
    # acknowledged, C-FIND verdict still needed
    ([(UP, Delivery(delivered=True))], Fate.WAIT, "not yet verified at PACS@h:1"),
    ([(UP, Delivery(delivered=True, verify_error="C-FIND failed for its study: x"))],
     Fate.WAIT, "C-FIND failed for its study: x"),
    # not there yet: down, or refused fewer than MAX_ATTEMPTS times
    ([(UP, Delivery(attempts=5, last_error="Connection refused"))], Fate.WAIT,
     "not yet at PACS@h:1: Connection refused"),
    ([(UP, Delivery(refusals=2, last_error="Refused: OutOfResources"))], Fate.WAIT, "not yet"),
    # refused MAX_ATTEMPTS times, or acknowledged and then not found as often
    ([(UP, Delivery(refusals=3, last_error="Error: CannotUnderstand"))], Fate.QUARANTINE,
     "refused by PACS@h:1 3 times: Error: CannotUnderstand"),
    ([(UP, Delivery(not_found=3))], Fate.QUARANTINE, "not found by C-FIND 3 times"),
    # one destination's quarantine verdict wins over another's wait
    ([(UP, Delivery(refusals=3)), (NO_FIND, Delivery(last_error="down"))], Fate.QUARANTINE,
     "refused by PACS@h:1"),
    # backup down, primary has it: waits for the backup only
    ([(NO_FIND, Delivery(delivered=True)), (UP, Delivery(last_error="down"))], Fate.WAIT,
     "not yet at PACS@h:1: down"),
])
def test_decide(states: list[tuple[Target, Delivery]], fate: Fate, says: str) -> None:
    verdict = decide(states, max_attempts=3)
    assert verdict.fate is fate
    assert says in verdict.reason


def test_decide_bounds_every_file_against_pacs_that_answer() -> None:
    """The bounded life as a property of the decision: whatever a PACS that answers says
    about a file, try after try (refusal, transient refusal, acknowledged-then-not-found,
    or success), the file has a final verdict after MAX_ATTEMPTS tries."""
    for answers in ("R", "A", "N"):
        state = Delivery()
        for _ in range(3):
            if answers in "RA":  # 0xC000 / 0xA700: both count as the PACS refusing it
                state = Delivery(refusals=state.refusals + 1, last_error=answers)
            else:  # acknowledged, then not listed: it loses its delivery
                state = Delivery(not_found=state.not_found + 1)
        assert decide([(UP, state)], max_attempts=3).fate is Fate.QUARANTINE, answers


# --- against real receivers -----------------------------------------------------------------


def receipt_of(site: Site, folder: str) -> dict:
    (path,) = site.archive_dir.glob(f"*/{glob_escape(folder)}.receipt.json")
    return json.loads(path.read_text(encoding="utf-8"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def use(site: Site, receiver: Orthanc | StoreSCP, prefix: str = "PACS") -> None:
    ip = "PACS_SERVER_IP" if prefix == "PACS" else f"{prefix}_IP"
    port = "PACS_SERVER_PORT" if prefix == "PACS" else f"{prefix}_PORT"
    site.env |= {ip: receiver.host, port: str(receiver.port), f"{prefix}_AET": receiver.aet}


def test_orthanc_as_debian_ships_it_auto_archives_after_one_run(site: Site) -> None:
    """Orthanc answers C-FIND only to AEs in DicomModalities: under verify = auto that is
    an answer. One run archives everything, says once how to get verification, and the
    receipt says the C-STORE answers are all there is."""
    make_patient_folder(site.import_dir, "#31-Find^Refused", 3)
    with Orthanc(config={"DicomAlwaysAllowFind": False}) as orthanc:
        use(site, orthanc)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert orthanc.count_instances() == 3
    assert len(site.archived()) == 3 and site.remaining() == []
    assert result.stderr.count("answers no C-FIND from STORESCU") == 1
    assert "DicomModalities" in result.stderr
    assert "3 acknowledged, 0 listed by C-FIND, 3 sent and archived" in result.stderr
    # one short line, not findscu's dump of the query keys
    assert "(0008,0052)" not in result.stderr
    receipt = receipt_of(site, "#31-Find^Refused")
    assert receipt["destinations"][0]["verification"].startswith("not answered")
    entry = receipt["files"][0]["destinations"]["primary"]
    assert entry["verified_by_c_find"] is False and "DicomModalities" in entry["c_store_only"]


def test_orthanc_as_debian_ships_it_c_find_required_waits(site: Site) -> None:
    """Under verify = c-find the same refusal leaves the files, with the fix in the reason;
    `importer check` says which verification the destination will get."""
    make_patient_folder(site.import_dir, "#32-Find^Required", 2)
    site.env["PACS_VERIFY"] = "c-find"
    with Orthanc(config={"DicomAlwaysAllowFind": False}) as orthanc:
        use(site, orthanc)
        result = site.run()
        check = site.run("check")
    assert result.returncode == 1, result.stderr
    assert site.archived() == {} and len(site.remaining()) == 2
    assert "not yet verified at ORTHANC@" in result.stderr and "DicomModalities" in result.stderr
    assert any(line.startswith("FAIL  C-FIND ORTHANC") and "refused" in line
               for line in check.stdout.splitlines()), check.stdout


def test_duplicate_uids_settle_in_one_run(site: Site, tmp_path: Path) -> None:
    """Twelve copies of one image and two different images under one UID: one run verifies
    and archives them all; the different content is named, in the log and the receipt."""
    folder = site.import_dir / "#33-Dup^Uids"
    same = {"study_uid": "1.2.826.0.1.3680043.8.498.33",
            "series_uid": "1.2.826.0.1.3680043.8.498.33.0"}
    make_ct(tmp_path / "one.dcm", sop_uid="1.2.826.0.1.3680043.8.498.33.1", **same)
    for i in range(12):
        folder.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "one.dcm", folder / f"copy{i:02}.dcm")
    for i, rows in enumerate((16, 32)):
        make_ct(folder / f"other{i}.dcm", rows=rows, sop_uid="1.2.826.0.1.3680043.8.498.33.2",
                **same)
    with Orthanc() as orthanc:
        use(site, orthanc)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert orthanc.count_instances() == 2
    assert len(site.archived()) == 14
    assert "other1.dcm carry the SOP Instance UID of other0.dcm with different content" \
        in result.stderr
    files = {f["path"]: f for f in receipt_of(site, "#33-Dup^Uids")["files"]}
    assert files["other1.dcm"]["same_uid_as"] == "other0.dcm"
    assert files["copy05.dcm"]["same_uid_as"] == "copy00.dcm"


def test_duplicate_uids_with_different_content_quarantined_on_request(site: Site) -> None:
    folder = site.import_dir / "#34-Dup^Quarantine"
    for i, rows in enumerate((16, 32)):
        make_ct(folder / f"other{i}.dcm", rows=rows, sop_uid="1.2.826.0.1.3680043.8.498.34.2")
    site.env["DUPLICATE_UIDS"] = "quarantine"
    with StoreSCP(site.root / "received") as storescp:
        use(site, storescp)
        result = site.run()
    assert result.returncode == 1
    assert set(site.archived()) == {"#34-Dup^Quarantine/other0.dcm"}
    (failed,) = site.failed().values()
    assert "DUPLICATE_UIDS=quarantine" in failed.with_name(
        failed.name + ".reason.txt").read_text()


def compressed(tool: list[str], source: Path, target: Path) -> Path:
    subprocess.run([*tool, str(source), str(target)], check=True, capture_output=True)
    return target


def test_transfer_syntaxes_the_pacs_does_not_accept(site: Site, tmp_path: Path) -> None:
    """storescp with its defaults accepts only uncompressed syntaxes. JPEG lossless, RLE and
    JPEG-LS lossless files go decompressed (the receipt says so) in the first run; a JPEG
    2000 file (pydicom's sample) and a lossy JPEG are quarantined at once, with a reason
    naming the syntax and the PACS; the lossy one goes with DECOMPRESS_LOSSY=true."""
    plain = tmp_path / "plain.dcm"
    make_ct(plain, rows=64)
    folder = site.import_dir / "#35-Syntax^Test"
    folder.mkdir()
    compressed(["dcmcjpeg", "+e1"], plain, folder / "jpeg-lossless.dcm")
    plain2 = tmp_path / "plain2.dcm"
    make_ct(plain2, rows=64)
    compressed(["dcmcrle"], plain2, folder / "rle.dcm")
    plain3 = tmp_path / "plain3.dcm"
    make_ct(plain3, rows=64)
    compressed(["dcmcjpls", "+el"], plain3, folder / "jpeg-ls.dcm")
    plain4 = tmp_path / "plain4.dcm"
    make_ct(plain4, rows=64, extra=lambda ds: setattr(ds, "BitsStored", 12) or setattr(
        ds, "HighBit", 11))
    compressed(["dcmcjpeg", "+ee"], plain4, folder / "jpeg-lossy.dcm")  # 12-bit extended
    j2k_folder = site.import_dir / "#36-J2k^Sample"
    j2k_folder.mkdir()
    shutil.copy(PYDICOM_DATA / "MR_small_jp2klossless.dcm", j2k_folder / "j2k.dcm")

    with StoreSCP(site.root / "received") as storescp:
        use(site, storescp)
        result = site.run()
        received = storescp.received_datasets()
    assert result.returncode == 1, result.stderr
    assert {Path(k).name for k in site.archived()} == {"jpeg-lossless.dcm", "rle.dcm",
                                                        "jpeg-ls.dcm"}
    assert all(ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" for ds in received)
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
                 for p in (plain, plain2, plain3)}
    for ds in received:  # lossless: the very pixels of the uncompressed original
        assert ds.PixelData == originals[ds.SOPInstanceUID].PixelData
    files = {f["path"]: f for f in receipt_of(site, "#35-Syntax^Test")["files"]}
    assert "sent decompressed" in files["rle.dcm"]["destinations"]["primary"]["c_store_status"]
    failed = {Path(k).name: v for k, v in site.failed().items()}
    assert set(failed) == {"j2k.dcm", "jpeg-lossy.dcm"}
    j2k_reason = failed["j2k.dcm"].with_name("j2k.dcm.reason.txt").read_text()
    assert "accepts no JPEG 2000" in j2k_reason and "DCMTK cannot decompress it" in j2k_reason
    assert "STORESCP@127.0.0.1" in j2k_reason
    assert "DECOMPRESS_LOSSY" in failed["jpeg-lossy.dcm"].with_name(
        "jpeg-lossy.dcm.reason.txt").read_text()

    # The lossy one, put back, goes decompressed when the site allows it.
    retried = site.run("retry", str(failed["jpeg-lossy.dcm"]))
    assert retried.returncode == 0, retried.stderr
    site.env["DECOMPRESS_LOSSY"] = "true"
    with StoreSCP(site.root / "received2") as storescp:
        use(site, storescp)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert len(storescp.received()) == 1


def test_backup_then_primary_sequence(site: Site) -> None:
    """Primary up (no C-FIND: its C-STORE answers are the verdict), backup down; then
    primary down, backup up: the second run sends to the backup only and archives all,
    never asking the primary again."""
    make_patient_folder(site.import_dir, "#37-Backup^Order", 3)
    backup_port = free_port()
    with StoreSCP(site.root / "primary") as primary:
        use(site, primary)
        site.env |= {"BACKUP_PACS_IP": "127.0.0.1", "BACKUP_PACS_PORT": str(backup_port),
                     "BACKUP_PACS_AET": "BACKUP"}
        first = site.run()
    assert first.returncode == 1 and site.archived() == {}
    assert len(primary.received()) == 3
    with StoreSCP(site.root / "backup", port=backup_port, aet="BACKUP") as backup:
        second = site.run()
        assert second.returncode == 0, second.stderr
        assert len(backup.received()) == 3
    assert len(site.archived()) == 3
    assert "C-FIND at STORESCP" not in second.stderr


def test_preamble_less_and_un_encoded_files_are_stamped_and_sent(
        site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set written without preamble and meta header, and one whose every element is
    UN (explicit VR): both are DICOM, stamped and sent, not archived unsent or quarantined."""
    folder = site.import_dir / "#38-Odd^Encoding"
    folder.mkdir()
    bare_source = tmp_path / "bare.dcm"
    make_ct(bare_source, rows=16)
    ds = pydicom.dcmread(bare_source)
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(folder / "no-preamble.dcm", ds, implicit_vr=False, little_endian=True)
    assert (folder / "no-preamble.dcm").read_bytes()[128:132] != b"DICM"

    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    un_source = tmp_path / "un.dcm"
    make_ct(un_source, rows=16)
    ds = pydicom.dcmread(un_source)
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)  # as read: the value's bytes, not yet decoded
        if tag < 0x7FE00000 and raw.VR != "SQ" and isinstance(raw.value, bytes):
            ds[tag] = pydicom.DataElement(tag, "UN", raw.value)
    ds.save_as(folder / "all-un.dcm")
    dumped = subprocess.run(["dcmdump", str(folder / "all-un.dcm")], capture_output=True,
                            text=True).stdout
    assert "(0010,0010) UN" in dumped

    with StoreSCP(site.root / "received") as storescp:
        use(site, storescp)
        result = site.run()
        received = storescp.received_datasets()
    assert result.returncode == 0, result.stderr
    assert len(received) == 2
    assert all((d.PatientID, str(d.PatientName)) == ("38", "Odd^Encoding") for d in received)
    assert len(site.archived()) == 2 and site.failed() == {}


def test_every_public_sample_reaches_a_verdict_within_max_attempts(site: Site,
                                                                   tmp_path: Path) -> None:
    """The bounded life, end to end, on data nobody here designed: pydicom's ~190 bundled
    files (compressed in every syntax, big-endian, implicit, truncated, RT, SR, DICOMDIRs,
    every character set) against storescp as it ships (uncompressed syntaxes only). After
    MAX_ATTEMPTS + 1 runs nothing is left for retry: each file is archived (sent, or unsent
    as not DICOM) or quarantined with a reason."""
    from pydicom.data import get_charset_files, get_testdata_files

    root = Path(pydicom.data.__file__).parent
    sources = {str(Path(f).relative_to(root)).replace("/", "__"): Path(f)
               for f in [*get_testdata_files(), *get_charset_files()] if Path(f).is_file()}
    folder = site.import_dir / "#39-Public^Samples"
    folder.mkdir()
    for name, path in sources.items():
        shutil.copyfile(path, folder / name)
    site.env |= {"MIXED_PATIENTS": "allow", "MAX_ATTEMPTS": "2"}
    with StoreSCP(tmp_path / "received") as receiver:
        use(site, receiver)
        results = [site.run(timeout=300) for _ in range(3)]
        received = receiver.received_datasets()
    assert site.remaining() == [], results[-1].stderr[-3000:]
    archived = {Path(k).name for k in site.archived()}
    failed = {Path(k).name: v for k, v in site.failed().items()}
    assert archived | set(failed) == set(sources) and not archived & set(failed)
    for name, path in failed.items():
        assert path.with_name(path.name + ".reason.txt").read_text().strip(), name
    assert all(ds.PatientID == "39" for ds in received)
    assert "left for retry" not in results[-1].stderr


def test_status_says_since_when_a_destination_fails(site: Site) -> None:
    """Files left for retry wait for a destination that is down: `importer status` says
    since when, and forgets it once the destination takes files again."""
    make_patient_folder(site.import_dir, "#40-Down^Since", 1)
    port = free_port()
    site.env |= {"PACS_SERVER_IP": "127.0.0.1", "PACS_SERVER_PORT": str(port)}
    assert site.run().returncode == 1
    assert site.run().returncode == 1
    status = json.loads(site.run("status", "--json").stdout)
    (primary,) = status["destinations"]
    assert primary["failing_since"] is not None
    assert primary["failing_since"] <= primary["last_failure"]
    assert "FAILING since" in site.run("status").stdout
    with StoreSCP(site.root / "received", port=port):
        assert site.run().returncode == 0
    (primary,) = json.loads(site.run("status", "--json").stdout)["destinations"]
    assert primary["failing_since"] is None
