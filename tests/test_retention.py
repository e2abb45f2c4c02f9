"""Retention never deletes the last copy (issue #16): prune asks each PACS again before it
deletes an archived folder, `importer resend` puts back what a PACS lost, `importer audit`
checks without deleting. Orthanc answers C-FIND; its REST API deletes an instance to play
a PACS that lost one. Time moves by renaming the archive batch to an old date (the date
in its name is what retention reads), not by waiting.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from simsite.dicomgen import make_patient_folder
from simsite.receivers import Orthanc, StoreSCP, free_port
from simsite.site import Site


def use(site: Site, orthanc: Orthanc | StoreSCP) -> None:
    site.env |= {"PACS_SERVER_IP": orthanc.host, "PACS_SERVER_PORT": str(orthanc.port),
                 "PACS_AET": orthanc.aet}


def archive_old(site: Site, folder: str, n_files: int, days: int) -> Path:
    """Import a folder now, then make its archive batch `days` days old; return the
    archived folder."""
    make_patient_folder(site.import_dir, folder, n_files, rows=16)
    result = site.run()
    assert result.returncode == 0, result.stderr
    (batch,) = [b for b in site.archive_dir.iterdir() if (b / folder).is_dir()
                and b.name > "2000"]
    old = batch.with_name((datetime.now() - timedelta(days=days)).strftime("%Y%m%d_%H%M%S"))
    while old.exists():
        old = old.with_name((datetime.strptime(old.name, "%Y%m%d_%H%M%S")
                             - timedelta(seconds=1)).strftime("%Y%m%d_%H%M%S"))
    batch.rename(old)
    return old / folder


def delete_in_orthanc(orthanc: Orthanc, sop_uid: str) -> None:
    (instance,) = [i for i in orthanc.instances()
                   if i["MainDicomTags"]["SOPInstanceUID"] == sop_uid]
    orthanc.request("DELETE", f"/instances/{instance['ID']}")


@pytest.fixture
def orthanc() -> Orthanc:
    with Orthanc(tcp_nodelay=True) as server:
        yield server


def test_prune_keeps_what_a_pacs_lost_and_resend_makes_it_prunable(
        site: Site, orthanc: Orthanc) -> None:
    use(site, orthanc)
    first = archive_old(site, "#51-Lost^One", 3, days=120)
    second = archive_old(site, "#52-Still^Held", 2, days=110)
    lost = sorted(first.iterdir())[1]
    lost_uid = pydicom.dcmread(lost).SOPInstanceUID
    delete_in_orthanc(orthanc, lost_uid)
    assert orthanc.count_instances() == 4

    dry = site.run("prune")
    assert dry.returncode == 0, dry.stderr
    assert f"kept {first}" in dry.stdout and "no longer lists 1 of its 3 instances" in dry.stdout
    assert first.exists() and second.exists(), "a dry run deletes nothing"

    real = site.run("prune", "--yes")
    assert real.returncode == 0, real.stderr
    assert "[WARN] Kept" in real.stderr and f"ORTHANC@127.0.0.1:{orthanc.port}" in real.stderr
    assert first.is_dir() and not second.exists() and not second.parent.exists()
    status = json.loads(site.run("status", "--json").stdout)
    (missing,) = status["missing_at_pacs"]
    assert missing["folder"] == str(first)
    assert missing["destinations"]["primary"]["missing"] == [lost.name]
    assert "Archived, missing at PACS" in site.run("status").stdout

    audit = site.run("audit")
    assert audit.returncode == 1
    assert "2 listed, 1 missing, 0 under another PatientID" in audit.stdout

    resent = site.run("resend", str(first))
    assert resent.returncode == 0, resent.stderr
    assert orthanc.count_instances() == 5
    restored = [i for i in orthanc.instances()
                if i["MainDicomTags"]["SOPInstanceUID"] == lost_uid]
    assert len(restored) == 1
    tags = orthanc.get(f"/instances/{restored[0]['ID']}/tags?short")
    assert tags["0010,0020"] == "51"
    stores = [r for r in site.log_records() if r.get("tool") == "storescu"]
    assert [len([a for a in r["argv"] if a.endswith(".dcm")]) for r in stores][-1] == 1, \
        "only the lost instance is sent again"
    receipts = sorted(site.archive_dir.glob("*/#51-Lost^One.receipt.json"))
    assert len(receipts) == 2  # the old one, and a new one for the resent instance
    assert json.loads(site.run("status", "--json").stdout)["missing_at_pacs"] == []

    again = site.run("prune", "--yes")
    assert again.returncode == 0, again.stderr
    assert not first.exists()
    assert site.run("audit").returncode == 0


def test_prune_keeps_everything_while_the_pacs_is_down(site: Site, orthanc: Orthanc) -> None:
    use(site, orthanc)
    folder = archive_old(site, "#53-Pacs^Down", 2, days=100)
    site.env["PACS_SERVER_PORT"] = str(free_port())
    result = site.run("prune", "--yes")
    assert result.returncode == 0, result.stderr
    assert folder.is_dir() and "could not ask" in result.stdout


def test_archives_without_receipt_or_unaskable_pacs_follow_prune_verify(site: Site) -> None:
    """The old scripts' archives have no receipt; storescp answers no C-FIND: `auto`
    deletes as before and says it could not check, `required` keeps."""
    old_scripts = site.archive_dir / (datetime.now() - timedelta(days=200)).strftime(
        "%Y%m%d_%H%M%S") / "#54-Old^Scripts"
    old_scripts.mkdir(parents=True)
    (old_scripts / "a.dcm").write_bytes(b"x")
    with StoreSCP(site.root / "received") as storescp:
        use(site, storescp)
        unaskable = archive_old(site, "#55-No^Find", 1, days=150)
        site.env["PRUNE_VERIFY"] = "required"
        kept = site.run("prune", "--yes")
        assert kept.returncode == 0, kept.stderr
        assert old_scripts.is_dir() and unaskable.is_dir()
        assert "PRUNE_VERIFY=required" in kept.stdout and "no receipt" in kept.stdout
        site.env["PRUNE_VERIFY"] = "auto"
        gone = site.run("prune", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert not old_scripts.exists() and not unaskable.exists()
    assert "could not be checked with a PACS" in gone.stdout
