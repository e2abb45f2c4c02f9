"""Many small folders in one batch (issue #15): the files of many folders share each tool
call, yet every folder gets its own verdict, receipt and summary, in the same run."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from importer import dcmtk, pipeline
from importer.config import load_settings
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import Orthanc, StoreSCP
from simsite.refusing_scp import CANNOT_UNDERSTAND, RefusingSCP
from simsite.site import Site, wait_for
from simsite.writers import WRITER, pixel_offset


def test_one_batch_many_folders_each_its_own_verdict(site: Site, tmp_path: Path) -> None:
    """40 folders of 2 files; in the same batch one folder's file is refused by the PACS,
    one folder holds two patients, one has a file still being written (it waits whole), one
    is unmatched: each gets its own verdict, and the 37 others are archived in this run with
    a receipt each (the refused file quarantined). The files of many folders went through
    single dcmdump and storescu calls."""
    site.env["MAX_ATTEMPTS"] = "1"
    site.env["INCOMPLETE_GRACE"] = "3600"
    for i in range(40):
        make_patient_folder(site.import_dir, f"#{100 + i}-Many^Folders", 2, rows=16)
    refused = pydicom.dcmread(site.import_dir / "#101-Many^Folders" / "IM00002.dcm")
    held = site.import_dir / "#102-Many^Folders"
    make_ct(held / "other-cd.dcm", rows=16, birth_date="19010101")
    make_ct(held / "IM00001.dcm", rows=16, birth_date="19990909")  # replaces one: two people
    source = tmp_path / "whole.dcm"
    make_ct(source, rows=64)
    go = tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(source),
                               str(site.import_dir / "#103-Many^Folders" / "late.dcm"),
                               str(pixel_offset(source)), str(go), "0"])
    wait_for(lambda: Path(str(go) + ".ready").exists(), 10)
    (site.import_dir / "not a patient").mkdir()
    (site.import_dir / "not a patient" / "x.dcm").write_bytes(b"x")

    with RefusingSCP(statuses={refused.SOPInstanceUID: CANNOT_UNDERSTAND}) as pacs:
        site.use(pacs)
        started = time.monotonic()
        result = site.run()
        seconds = time.monotonic() - started
        go.touch()
        assert writer.wait(timeout=10) == 0
        accepted = pacs.accepted_uids()
    assert result.returncode == 1, result.stderr

    archived = site.archived()
    done = {k.split("/")[0] for k in archived}
    assert done == {f"#{100 + i}-Many^Folders" for i in range(40)} - {
        "#102-Many^Folders", "#103-Many^Folders"}
    assert "#101-Many^Folders/IM00002.dcm" not in archived
    assert set(site.failed()) == {"#101-Many^Folders/IM00002.dcm"}
    assert sorted(p for p in site.remaining() if p.startswith("#102")) == [
        "#102-Many^Folders/IM00001.dcm", "#102-Many^Folders/IM00002.dcm",
        "#102-Many^Folders/other-cd.dcm"]
    assert sorted(p for p in site.remaining() if p.startswith("#103")) == [
        "#103-Many^Folders/IM00001.dcm", "#103-Many^Folders/IM00002.dcm",
        "#103-Many^Folders/late.dcm"]
    assert "not a patient/x.dcm" in site.remaining()
    assert len(accepted) == 2 * 40 - 4 - 1  # all but #102's and #103's and the refused one
    for name in done:
        receipt = json.loads(next(site.archive_dir.glob(
            f"*/{name.replace('^', '[^]')}.receipt.json")).read_text())
        assert receipt["folder"] == name and receipt["patient"]["id"] == name[1:4]
    assert "#102-Many^Folders: held" in result.stderr
    assert "#103-Many^Folders/late.dcm: still being written" in result.stderr
    tools = [r for r in site.log_records() if r.get("tool")]
    dumps = [r for r in tools if r["tool"] == "dcmdump" and "/dev/null" not in r["argv"]]
    stores = [r for r in tools if r["tool"] == "storescu"]
    assert len(dumps) <= 2 * 2, "the folders' files are read and verified together"
    assert len(stores) <= 4, "the folders' files share associations"
    assert seconds < 30


def test_a_pace_measured_in_one_batch_sizes_the_next_batch_s_associations(
        site: Site, tmp_path: Path) -> None:
    """Against a PACS that answers fast, one storescu per 200 files is cheapest; one that
    stalls per file wants parallel associations from its first chunk. The first batch to a
    PACS cannot know which it is; what its answers showed is kept in the journal, so the next
    batch sizes its first chunk's associations by it."""
    with StoreSCP(tmp_path / "rx") as pacs:
        site.use(pacs)
        make_patient_folder(site.import_dir, "#71-First^Batch", 30, rows=16)
        assert site.run().returncode == 0
        with sqlite3.connect(site.state_dir / "journal.sqlite3") as db:
            (pace,), = db.execute("SELECT seconds_per_file FROM destination").fetchall()
        assert 0 < pace < 0.01  # storescp with TCP_NODELAY: fast

        make_patient_folder(site.import_dir, "#72-Next^Batch", 199, rows=16)
        offset = len(site.log_records())
        assert site.run().returncode == 0
        stores = [r for r in site.log_records()[offset:] if r.get("tool") == "storescu"]
        assert len(stores) == 1  # not measured, it would have gone over two associations
        assert len(pacs.received()) == 229


def test_a_big_folder_is_stamped_and_sent_in_parts_and_verified_once(
        site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A folder of more than 2 × SLICE_FILES files goes in parts: the first part is sent
    while the next is stamped, files that share a SOP Instance UID stay in one part, the
    PACS is asked once per study after the last part, and the folder gets one verdict,
    one receipt and one archive, as a small folder does."""
    monkeypatch.setattr(pipeline, "SLICE_FILES", 4)
    folder = site.import_dir / "#4321-Big^Study"
    make_patient_folder(site.import_dir, folder.name, 11, rows=8)
    twin = pydicom.dcmread(folder / "IM00003.dcm")
    twin.Rows = twin.Columns = 4
    twin.PixelData = b"\0" * 32
    twin.save_as(folder / "IM00003-again.dcm")  # the same UID, other content
    finds = []
    real_find = dcmtk.find_instances
    monkeypatch.setattr(dcmtk, "find_instances",
                        lambda *a, **k: finds.append(a[1]) or real_find(*a, **k))
    with Orthanc() as orthanc:
        site.env |= {"PACS_SERVER_IP": orthanc.host, "PACS_SERVER_PORT": str(orthanc.port),
                     "PACS_AET": orthanc.aet, "VERIFY_DELAY": "0"}
        with caplog.at_level(logging.INFO, logger="importer"):
            report = pipeline.run_batch(load_settings({}, site.env))
        lines = caplog.messages
        assert report.exit_code == 0, lines
        assert orthanc.count_instances() == 11
        assert [p["MainDicomTags"]["PatientID"] for p in orthanc.patients()] == ["4321"]
    stamping = [i for i, line in enumerate(lines) if "stamping" in line]
    sending = [i for i, line in enumerate(lines) if "sending" in line]
    assert len(stamping) == 3 and len(sending) >= 3  # 12 files: parts of 4, 4 and 4
    assert sending[0] < stamping[1]  # the first part went before the second was stamped
    assert any("carry the SOP Instance UID of" in line and "IM00003-again.dcm" in line
               and "IM00003.dcm" in line for line in lines)  # both in one part, compared
    assert len(finds) == 1  # one study, asked once
    assert len(site.archived()) == 12 and not folder.exists()
    (receipt,) = site.archive_dir.glob("*/*.receipt.json")
    assert len(json.loads(receipt.read_text())["files"]) == 12
