"""`importer run-once` end to end: real DCMTK tools against a real storescp on loopback.

Each test asserts what a user cares about: which files the receiver got and with which
identity, what was archived where, what stayed in the import dir, and the exit code.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from importer.config import load_settings
from importer.snapshot import folder_lock
from simsite.dicomgen import make_ct, make_patient_folder, truncated_copy, write_non_dicom
from simsite.receivers import StoreSCP
from simsite.site import IMPORTER, Site


def by_uid(receiver: StoreSCP) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in receiver.received_datasets()}


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (or link target): 'untouched' made exact."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = os.fsencode(path.relative_to(root)).hex()
        if path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[rel] = "dir"
    return digest


def test_folders_are_stamped_sent_and_archived(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    ascii_files = make_patient_folder(site.import_dir, "#12345-Doe^John", 5, rows=16, subdirs=2)
    korean_files = make_patient_folder(site.import_dir, "#777-홍길동", 3, rows=16)
    bare = site.import_dir / "#777-홍길동" / "no-patient-tags.dcm"
    bare_uid = make_ct(bare, rows=16, omit_patient_tags=True)

    result = site.run()

    assert result.returncode == 0, result.stderr
    received = by_uid(storescp)
    assert len(received) == 9
    for path in ascii_files:
        rel = str(path.relative_to(site.import_dir))
        archived = pydicom.dcmread(site.archived()[rel])
        ds = received[archived.SOPInstanceUID]
        assert (ds.PatientID, str(ds.PatientName)) == ("12345", "Doe^John")
        assert "SpecificCharacterSet" not in ds  # an ASCII name needs no character set
    for path in [*korean_files, bare]:
        archived = pydicom.dcmread(site.archived()[str(path.relative_to(site.import_dir))])
        ds = received[archived.SOPInstanceUID]
        assert (ds.PatientID, str(ds.PatientName)) == ("777", "홍길동")
        assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert received[bare_uid].PatientID == "777"  # inserted, not skipped (dcmodify -i)
    # Archive layout: ARCHIVE_DIR/<yyyymmdd_hhmmss>/<folder>/<same relative path>.
    (batch,) = site.archive_dir.iterdir()
    assert len(batch.name) == 15 and batch.name[8] == "_"
    assert (batch / "#12345-Doe^John" / "d1" / "d2" / "IM00002.dcm").is_file()
    assert site.remaining() == []
    assert not any(site.import_dir.iterdir()), "folders and the work dir are cleaned up"
    # Console keeps the old tags; JSON logs hold one record per DCMTK call.
    for tag in ("[PHASE 1]", "[PHASE 1.5]", "[PHASE 2]", "[PHASE 3]", "[INFO]"):
        assert tag in result.stderr
    assert ("#12345-Doe^John: 5 acknowledged, 0 listed by C-FIND, 5 sent and archived"
            in result.stderr)
    tools = [r for r in site.log_records() if "tool" in r]
    assert {r["tool"] for r in tools} >= {"dcmftest", "dcmdump", "dcmodify", "storescu"}
    store = next(r for r in tools if r["tool"] == "storescu")
    assert store["exit_code"] == 0 and store["argv"][0] == "storescu"
    assert any("Received Store Response (Success)" in line for line in store["output"])
    assert len([p for p in site.log_dir.iterdir() if p.name != "log.log"]) == 1
    # Batched: never one dcmodify process per file; one per folder and original identity
    # (the file without patient tags keeps another original identity: none).
    assert sum(r["tool"] == "dcmodify" for r in tools) == 3


def test_bad_files_are_never_sent_and_nothing_is_lost(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    folder = site.import_dir / "#5-Roe^Jane"
    good_uid = make_ct(folder / "good.dcm", rows=16)
    make_ct(folder / "whole.dcm", rows=64)
    truncated_copy(folder / "whole.dcm", folder / "cut.dcm", 2000)  # DICM magic, cut short
    (folder / "whole.dcm").unlink()
    (folder / "empty.dcm").write_bytes(b"")
    write_non_dicom(folder / "notes.txt")
    make_ct(folder / "DICOMDIR", rows=16,  # a CD's index: DICOM, but never sent
            extra=lambda ds: setattr(ds.file_meta, "MediaStorageSOPClassUID",
                                     "1.2.840.10008.1.3.10"))

    result = site.run()

    assert result.returncode == 1, "a quarantined file is not a clean run"
    assert set(by_uid(storescp)) == {good_uid}
    archived = site.archived()
    assert set(archived) == {"#5-Roe^Jane/good.dcm", "#5-Roe^Jane/empty.dcm",
                             "#5-Roe^Jane/notes.txt", "#5-Roe^Jane/DICOMDIR"}
    assert archived["#5-Roe^Jane/notes.txt"].read_text() == "not a DICOM file\n"
    failed = site.failed()
    assert set(failed) == {"#5-Roe^Jane/cut.dcm"}
    assert failed["#5-Roe^Jane/cut.dcm"].stat().st_size == 2000, "quarantined as it was"
    reason = failed["#5-Roe^Jane/cut.dcm"].with_name("cut.dcm.reason.txt").read_text()
    assert "DCMTK cannot read this file" in reason
    # One line per folder on the console; every file, with what it is, in the JSON log.
    assert ("Not a DICOM file: #5-Roe^Jane/empty.dcm (empty) and 1 more file: archived with"
            " its folder, not sent") in result.stderr
    assert "Not a DICOM file: #5-Roe^Jane/notes.txt (text;" in "\n".join(
        r["message"] for r in site.log_records())
    assert site.remaining() == []


# A Windows program's first bytes (DOS header, e_lfanew 0x80) and a TrueType font's: zeros
# where a DICOM file has its magic, like a file preallocated by a writer still at work.
PE_BYTES = b"MZ\x90\x00\x03" + b"\0" * 55 + b"\xf0\0\0\0" + b"\0" * 176 + b"PE\0\0" + b"\0" * 2000
TTF_BYTES = b"\x00\x01\x00\x00\x00\x0c\x00\x80\x00\x03\x00\x40cmap" + b"\0" * 3000


def test_a_cd_copied_whole_goes_at_once(site: Site, storescp: StoreSCP) -> None:
    """A patient CD copied whole into a folder: extensionless DICOM files under IHE_PDI/, its
    DICOMDIR, the viewer (a program, a library, a page, autorun.inf, a font) and a note. The
    images go at once under the folder's identity; the rest is archived unsent beside them in
    the same run, although INCOMPLETE_GRACE is an hour (issue 23); the summary says in words
    what was not sent; run-once exits 0 and nothing stays in the import dir."""
    site.use(storescp)
    site.env["INCOMPLETE_GRACE"] = "3600"
    folder = site.import_dir / "#4711-Cd^Copy"
    study = generate_uid()
    uids = set()
    for series, count in (("SER1", 3), ("SER2", 2)):
        series_uid = generate_uid()
        for i in range(1, count + 1):
            uids.add(make_ct(folder / "IHE_PDI" / "PAT1" / "STU1" / series / f"IMG{i}", rows=16,
                             study_uid=study, series_uid=series_uid, instance_number=i))
    if shutil.which("dcmmkdir"):  # the CD's index, as DCMTK writes one
        subprocess.run(["dcmmkdir", "+r", "+I", "IHE_PDI"], cwd=folder, check=True,
                       capture_output=True)
    else:
        make_ct(folder / "DICOMDIR", rows=16, extra=lambda ds: setattr(
            ds.file_meta, "MediaStorageSOPClassUID", "1.2.840.10008.1.3.10"))
    viewer = {
        "autorun.inf": b"[autorun]\r\nopen=VIEWER\\viewer.exe\r\nicon=VIEWER\\viewer.exe\r\n",
        "VIEWER/viewer.exe": PE_BYTES,
        "VIEWER/dcmview.dll": PE_BYTES + b"library",
        "VIEWER/help/index.html": b"<!DOCTYPE html>\n<html><body>Open viewer.exe</body></html>\n",
        "VIEWER/fonts/viewer.ttf": TTF_BYTES,
        "notes.txt": b"see report\n",  # 11 bytes, as in the issue
    }
    for rel, data in viewer.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    dicomdir = (folder / "DICOMDIR").read_bytes()
    every_file = {str(p.relative_to(site.import_dir)) for p in folder.rglob("*") if p.is_file()}

    result = site.run()

    assert result.returncode == 0, result.stderr
    received = by_uid(storescp)
    assert set(received) == uids
    assert all((ds.PatientID, str(ds.PatientName)) == ("4711", "Cd^Copy")
               for ds in received.values())
    archived = site.archived()
    assert set(archived) == every_file  # unsent ones too, beside the images
    assert archived["#4711-Cd^Copy/DICOMDIR"].read_bytes() == dicomdir  # as it came
    for rel, data in viewer.items():
        assert archived[f"#4711-Cd^Copy/{rel}"].read_bytes() == data, rel
    image = archived["#4711-Cd^Copy/IHE_PDI/PAT1/STU1/SER2/IMG2"]
    assert pydicom.dcmread(image).PatientID == "4711"  # stamped, archived under its own path
    assert site.failed() == {} and site.remaining() == []
    assert not any(site.import_dir.iterdir())
    assert ("#4711-Cd^Copy: 5 acknowledged, 0 listed by C-FIND, 5 sent and archived,"
            " 1 DICOMDIR archived unsent, 5 viewer/program files archived unsent,"
            " 1 text file archived unsent, 0 quarantined, 0 left for retry,"
            " 0 still being written, 0 left in place") in result.stderr
    assert "still being written or incomplete" not in result.stderr
    assert result.stderr.count("Not a DICOM file") == 1  # one line for the folder, not per file
    sent = [arg for r in site.log_records() if r.get("tool") == "storescu" for arg in r["argv"]]
    assert not [arg for arg in sent if "VIEWER" in arg or "DICOMDIR" in arg or ".txt" in arg]
    receipt = json.loads((archived["#4711-Cd^Copy/notes.txt"].parent.parent
                          / "#4711-Cd^Copy.receipt.json").read_text(encoding="utf-8"))
    why = {f["path"]: f.get("why") for f in receipt["files"]}
    assert why["notes.txt"] == "not DICOM (text file): archived with its folder, never sent"
    assert why["VIEWER/viewer.exe"].startswith("not DICOM (viewer/program file)")
    assert why["DICOMDIR"].startswith("a DICOMDIR")
    assert why["IHE_PDI/PAT1/STU1/SER1/IMG1"] is None


def test_unmatched_folders_loose_files_and_hostile_names_stay_untouched(
        site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    canary = site.root / "pwned"  # the importer runs in site.root
    hostile = ["#1-$(touch pwned)", "#2-a;touch pwned", "#3-`touch pwned`", "#4-a b",
               "#5-new\nline", "no hash", "#6-quote'\"", "$(touch pwned)", "#8-a|touch pwned"]
    for name in hostile:
        make_ct(site.import_dir / name / "a.dcm", rows=16)
    os.mkdir(os.fsencode(site.import_dir) + b"/#7-\xff\xfe")
    make_ct(os.fsdecode(os.fsencode(site.import_dir) + b"/#7-\xff\xfe/a.dcm"), rows=16)
    make_ct(site.import_dir / "loose.dcm", rows=16)
    before = tree_digest(site.import_dir)

    result = site.run()
    second = site.run()

    assert result.returncode == 0, result.stderr
    assert tree_digest(site.import_dir) == before
    assert storescp.received() == []
    assert not canary.exists()
    assert result.stderr.count("Pattern does not match") == len(hostile) + 2
    assert "#5-new\\nline" in result.stderr and "#7-\\xff\\xfe" in result.stderr
    assert second.returncode == 0


def test_pacs_down_keeps_everything_then_delivers(site: Site, tmp_path: Path) -> None:
    receiver = StoreSCP(tmp_path / "received")  # not started yet: connection refused
    site.use(receiver)
    uids = {make_ct(site.import_dir / "#9-Down^Pacs" / f"{i}.dcm", rows=16) for i in range(4)}

    down = site.run()

    assert down.returncode == 1
    assert "Connection refused" in down.stderr
    assert site.archived() == {} and site.failed() == {}
    assert len(site.remaining()) == 4
    with receiver:
        up = site.run()
        got = by_uid(receiver)
    assert up.returncode == 0, up.stderr
    assert set(got) == uids
    assert all(ds.PatientID == "9" for ds in got.values())
    assert len(site.archived()) == 4 and site.remaining() == []


def test_refused_association_is_transient(site: Site, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "received", extra_args=["--refuse"]) as refusing:
        site.use(refusing)
        make_ct(site.import_dir / "#10-Refused^Assoc" / "a.dcm", rows=16)
        result = site.run()
        assert refusing.received() == []
    assert result.returncode == 1
    assert "Association Rejected" in result.stderr
    assert site.archived() == {} and site.remaining() == ["#10-Refused^Assoc/a.dcm"]


def test_symlinks_are_never_followed(site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    site.use(storescp)
    outside = tmp_path / "outside"
    outside_uid = make_ct(outside / "secret.dcm", rows=16, patient_id="OTHER")
    folder = site.import_dir / "#11-Link^Test"
    own_uid = make_ct(folder / "own.dcm", rows=16)
    (folder / "link.dcm").symlink_to(outside / "secret.dcm")
    (folder / "linkdir").symlink_to(outside)
    before = (outside / "secret.dcm").read_bytes()

    result = site.run()

    assert set(by_uid(storescp)) == {own_uid}
    assert outside_uid not in by_uid(storescp)
    assert (outside / "secret.dcm").read_bytes() == before
    assert sorted(site.remaining()) == ["#11-Link^Test/link.dcm", "#11-Link^Test/linkdir"]
    assert "symbolic link, not followed" in result.stderr
    assert result.returncode == 0


def test_file_names_that_are_not_utf8_are_sent_and_archived(site: Site,
                                                             storescp: StoreSCP) -> None:
    site.use(storescp)
    folder = site.import_dir / "#12-Bytes^Name"
    raw = os.fsencode(folder) + b"/IM\xe9 1 $(x).dcm"
    uid = make_ct(os.fsdecode(raw), rows=16)

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert by_uid(storescp)[uid].PatientID == "12"
    (archived,) = site.archived().values()
    assert os.fsencode(archived.name) == b"IM\xe9 1 $(x).dcm"


def test_dry_run_touches_nothing(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    make_patient_folder(site.import_dir, "#13-Dry^Run", 3, rows=16)
    write_non_dicom(site.import_dir / "#13-Dry^Run" / "readme.txt")
    before = tree_digest(site.import_dir)

    result = site.run("run-once", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "would stamp 3 files as ID 13 / name Dry^Run" in result.stderr
    assert "1 text file to archive unsent" in result.stderr
    assert tree_digest(site.import_dir) == before
    assert storescp.received() == []
    for path in (site.archive_dir, site.failed_dir, site.log_dir, site.state_dir):
        assert not path.exists()


def test_files_arriving_during_the_run_wait_for_the_next(site: Site, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "received", extra_args=["--sleep-during", "2"]) as slow:
        site.use(slow)
        folder = site.import_dir / "#14-Late^Arrival"
        first = make_ct(folder / "first.dcm", rows=16)
        process = subprocess.Popen([IMPORTER, "run-once"], env=site.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while "\"PHASE 2\"" not in _read(site.log_dir / "log.log"):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        late = make_ct(folder / "late.dcm", rows=16)
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert set(by_uid(slow)) == {first}
    assert set(site.archived()) == {"#14-Late^Arrival/first.dcm"}
    assert site.remaining() == ["#14-Late^Arrival/late.dcm"]
    assert pydicom.dcmread(folder / "late.dcm").SOPInstanceUID == late


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def test_primary_and_backup_both_get_every_file(site: Site, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "primary") as primary, StoreSCP(tmp_path / "backup",
                                                             aet="BACKUP") as backup:
        site.use(primary)
        site.use(backup, "BACKUP_PACS")
        uids = {make_ct(site.import_dir / "#15-Two^Pacs" / f"{i}.dcm", rows=16)
                for i in range(20)}
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert set(by_uid(primary)) == uids and set(by_uid(backup)) == uids
    assert len(site.archived()) == 20


def test_backup_down_holds_files_and_retry_sends_only_what_is_missing(
        site: Site, tmp_path: Path) -> None:
    backup = StoreSCP(tmp_path / "backup", aet="BACKUP")
    with StoreSCP(tmp_path / "primary") as primary:
        site.use(primary)
        site.use(backup, "BACKUP_PACS")
        uids = {make_ct(site.import_dir / "#16-Backup^Down" / f"{i}.dcm", rows=16)
                for i in range(3)}
        first = site.run()
        assert first.returncode == 1
        assert site.archived() == {} and len(site.remaining()) == 3
        assert set(by_uid(primary)) == uids
        primary_files = primary.received()
        for path in primary_files:
            path.unlink()  # a resend to the primary would show up here
        with backup:
            second = site.run()
            assert second.returncode == 0, second.stderr
            assert set(by_uid(backup)) == uids
        assert primary.received() == [], "the primary already had them"
    assert len(site.archived()) == 3 and site.remaining() == []


def test_busy_folder_exits_3_and_is_left_alone(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    make_ct(site.import_dir / "#17-Busy^Folder" / "a.dcm", rows=16)
    settings = load_settings({}, site.env)
    with folder_lock(settings, "#17-Busy^Folder") as acquired:
        assert acquired
        result = site.run()
    assert result.returncode == 3
    assert "being processed by another importer" in result.stderr
    assert storescp.received() == [] and site.remaining() == ["#17-Busy^Folder/a.dcm"]


def test_missing_dcmtk_and_bad_config_exit_2_without_traceback(site: Site) -> None:
    no_dcmtk = {**site.env, "PATH": str(Path(IMPORTER).parent)}
    result = site.run(env=no_dcmtk)
    assert result.returncode == 2
    assert "not found — install dcmtk" in result.stderr
    bad_port = {**site.env, "PACS_SERVER_PORT": "eleven"}
    result = site.run(env=bad_port)
    assert result.returncode == 2
    assert "PACS_SERVER_PORT: 'eleven' is not a port number" in result.stderr
    assert "Traceback" not in result.stderr


def test_compressed_files_and_uncommon_sop_classes_are_delivered(site: Site,
                                                                 tmp_path: Path) -> None:
    """storescu proposes only uncompressed syntaxes and its default SOP classes unless told;
    the importer proposes what each file needs (-R and -xy/-xw/-xr/…)."""
    from pydicom.data import get_testdata_file

    samples = {  # file -> transfer syntax it keeps
        "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",
        "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
        "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
        "JPEGLSNearLossless_08.dcm": "1.2.840.10008.1.2.4.81",
        "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated
        "liver_1frame.dcm": "1.2.840.10008.1.2.1",  # Segmentation: not in storescu's list
    }
    folder = site.import_dir / "#30-Compressed^Mix"
    folder.mkdir()
    uids = {}
    for name in samples:
        source = get_testdata_file(name)
        assert source, f"pydicom sample {name} missing"
        shutil.copyfile(source, folder / name)
        uids[pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID] = name
    assert len(uids) == len(samples), "each sample is a distinct instance"
    site.env["MIXED_PATIENTS"] = "allow"  # pydicom's samples are of different people
    with StoreSCP(tmp_path / "received", extra_args=["+xa"]) as receiver:  # accept all
        site.use(receiver)
        result = site.run()
        received = by_uid(receiver)
    assert result.returncode == 0, result.stderr
    assert set(received) == set(uids)
    for uid, ds in received.items():
        assert ds.PatientID == "30" and str(ds.PatientName) == "Compressed^Mix"
        assert ds.file_meta.TransferSyntaxUID == samples[uids[uid]], uids[uid]
    assert len(site.archived()) == len(samples)


def test_files_of_default_classes_go_without_R_and_an_unproposed_class_goes_again_with_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """storescu -R reads every file once more before the association: files of the classes
    storescu proposes anyway go without it. Should a class on that list not be proposed
    after all (another DCMTK release), its files go again with -R: delivered, not refused."""
    from pydicom.data import get_testdata_file

    from importer import dcmtk
    from importer.config import Destination

    storescu = importlib.import_module("importer.dcmtk.store")  # (dcmtk.store: the function)
    segmentation = str(tmp_path / "seg.dcm")
    shutil.copyfile(get_testdata_file("liver_1frame.dcm"), segmentation)
    ct = str(tmp_path / "ct.dcm")
    uids = {make_ct(Path(ct), rows=16), pydicom.dcmread(segmentation).SOPInstanceUID}
    seg_class, ct_class = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.2"
    assert seg_class not in storescu.STORESCU_PROPOSES and ct_class in storescu.STORESCU_PROPOSES
    with StoreSCP(tmp_path / "received") as receiver, caplog.at_level("DEBUG", "importer.dcmtk"):
        destination = Destination("pacs", receiver.host, receiver.port, receiver.aet)
        alone, _ = dcmtk.store(destination, [ct], sop_classes={ct: ct_class})
        monkeypatch.setattr(storescu, "STORESCU_PROPOSES",
                            storescu.STORESCU_PROPOSES | {seg_class})  # a wrong list
        both, error = dcmtk.store(destination, [segmentation, ct],
                                  sop_classes={segmentation: seg_class, ct: ct_class})
        received = {ds.SOPInstanceUID for ds in receiver.received_datasets()}
    runs = [r.argv for r in caplog.records if getattr(r, "tool", None) == "storescu"]
    assert alone[ct].outcome is dcmtk.Outcome.DELIVERED and "-R" not in runs[0]
    assert {path: r.outcome for path, r in both.items()} == {
        segmentation: dcmtk.Outcome.DELIVERED, ct: dcmtk.Outcome.DELIVERED}, both
    assert "-R" not in runs[1] and "-R" in runs[2] and len(runs) == 3, runs
    assert received == uids and error == ""


def test_a_crash_mid_stamp_costs_no_original(site: Site, storescp: StoreSCP) -> None:
    """The state dcmodify leaves when killed mid-write: original renamed to <file>.bak, the
    new file half written. The next run restores the original before anything else."""
    from importer.intent import intent_path, write_intent

    site.use(storescp)
    folder = site.import_dir / "#31-Crash^Midway"
    uid = make_ct(folder / "a.dcm", rows=32)
    original = (folder / "a.dcm").read_bytes()
    os.rename(folder / "a.dcm", folder / "a.dcm.bak")
    (folder / "a.dcm").write_bytes(original[:700])  # the half-written new file
    settings = load_settings({}, site.env)
    write_intent(intent_path(settings, folder.name), [str(folder / "a.dcm")])

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert "originals restored" in result.stderr
    assert by_uid(storescp)[uid].PatientID == "31"
    assert set(site.archived()) == {"#31-Crash^Midway/a.dcm"} and site.failed() == {}
    archived = pydicom.dcmread(site.archived()["#31-Crash^Midway/a.dcm"])
    assert archived.PixelData == pydicom.dcmread(io.BytesIO(original)).PixelData
