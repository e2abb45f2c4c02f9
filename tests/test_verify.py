"""Proof of delivery: C-FIND back before archiving, and a receipt per folder.

Real receivers: Orthanc (answers C-FIND), a pynetdicom PACS that acknowledges everything
but drops or misfiles instances (simsite/forgetful_pacs.py), and storescp (no C-FIND).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from simsite.dicomgen import make_patient_folder
from simsite.forgetful_pacs import ForgetfulPACS
from simsite.receivers import Orthanc, StoreSCP
from simsite.site import Site


def use(site: Site, pacs: ForgetfulPACS | Orthanc | StoreSCP) -> None:
    site.env |= {"PACS_SERVER_IP": pacs.host, "PACS_SERVER_PORT": str(pacs.port),
                 "PACS_AET": pacs.aet, "VERIFY_DELAY": "0", "VERIFY_ATTEMPTS": "2",
                 "MAX_ATTEMPTS": "2"}


def receipt_of(site: Site, folder: str) -> dict:
    (path,) = site.archive_dir.glob(f"*/{folder}.receipt.json")
    return json.loads(path.read_text(encoding="utf-8"))


def tool_calls(site: Site, tool: str) -> list[dict]:
    return [r for r in site.log_records() if r.get("tool") == tool]


def test_orthanc_lists_every_instance_and_the_receipt_says_so(site: Site) -> None:
    with Orthanc(tcp_nodelay=True) as pacs:
        use(site, pacs)
        make_patient_folder(site.import_dir, "#60-Verified^Patient", 5, rows=16, subdirs=1)
        result = site.run()
        assert pacs.count_instances() == 5
    assert result.returncode == 0, result.stderr
    assert len(site.archived()) == 5
    verify_finds = [r for r in tool_calls(site, "findscu")
                    if "QueryRetrieveLevel=IMAGE" in r["argv"]]
    assert len(verify_finds) == 1, "one C-FIND per study, not per instance"
    # and, before stamping, one for the patient ID, one for the study (reconcile.py)
    assert len(tool_calls(site, "findscu")) == 3
    receipt = receipt_of(site, "#60-Verified^Patient")
    assert receipt["patient"] == {"id": "60", "name": "Verified^Patient"}
    assert receipt["destinations"][0]["verification"] == "c-find"
    assert len(receipt["files"]) == 5
    for entry in receipt["files"]:
        (state,) = entry["destinations"].values()
        assert state["c_store_status"] == "Success" and state["verified_by_c_find"] is True
        assert entry["sop_instance_uid"] and entry["study_instance_uid"] and entry["size"] > 0
    assert receipt["files"][0]["path"].startswith("d1/")
    table = site.run("receipt", str(site.archived()["#60-Verified^Patient/d1/IM00001.dcm"]
                                    .parent.parent))
    assert table.returncode == 0, table.stderr
    assert "Success +C-FIND" in table.stdout and "5 files sent" in table.stdout


def test_dropped_and_misfiled_instances_are_never_archived(site: Site) -> None:
    folder = "#61-Forgetful^Pacs"
    with ForgetfulPACS(drop={2}, refile={3: "SOMEONE-ELSE"}) as pacs:
        use(site, pacs)
        # The verification alone: with reconciliation, the second run would hold the folder
        # (its study is filed under another PatientID there: tests/test_reconcile.py).
        site.env["RECONCILE"] = "off"
        make_patient_folder(site.import_dir, folder, 5, rows=16)
        first = site.run()
        second = site.run()  # the dropped one is sent again, and dropped again
        sends = pacs.stores
    assert first.returncode == 1 and second.returncode == 1
    archived = sorted(site.archived())
    assert archived == [f"{folder}/IM00001.dcm", f"{folder}/IM00004.dcm",
                        f"{folder}/IM00005.dcm"]
    failed = site.failed()
    assert sorted(failed) == [f"{folder}/IM00002.dcm", f"{folder}/IM00003.dcm"]
    dropped = (failed[f"{folder}/IM00002.dcm"].with_name("IM00002.dcm.reason.txt")
               .read_text())
    misfiled = (failed[f"{folder}/IM00003.dcm"].with_name("IM00003.dcm.reason.txt")
                .read_text())
    assert f"acknowledged by FORGETFUL@127.0.0.1:{pacs.port} but not found by C-FIND 2 times" \
        in dropped
    assert "under PatientID 'SOMEONE-ELSE', not the folder's '61'" in misfiled
    assert "under PatientID 'SOMEONE-ELSE'" in first.stderr
    assert len(sends) == 6, "5 sends, then only the dropped instance again"
    receipt = receipt_of(site, folder)
    assert {e["path"] for e in receipt["files"]} == {"IM00001.dcm", "IM00004.dcm",
                                                      "IM00005.dcm"}
    assert site.remaining() == []


def test_a_pacs_that_indexes_late_is_asked_again_not_sent_again(site: Site) -> None:
    with ForgetfulPACS(index_delay=1.0) as pacs:
        use(site, pacs)
        site.env |= {"VERIFY_DELAY": "1", "VERIFY_ATTEMPTS": "4"}
        make_patient_folder(site.import_dir, "#62-Slow^Index", 3, rows=16)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert len(pacs.stores) == 3 and pacs.finds >= 2
    assert len(site.archived()) == 3


def test_storescp_under_auto_relies_on_c_store_and_says_so_once(site: Site,
                                                                storescp: StoreSCP) -> None:
    use(site, storescp)
    make_patient_folder(site.import_dir, "#63-No^Find", 2, rows=16)
    make_patient_folder(site.import_dir, "#64-No^Find", 2, rows=16)
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("answers no C-FIND") == 1
    assert len(site.archived()) == 4
    receipt = receipt_of(site, "#63-No^Find")
    assert receipt["destinations"][0]["verification"].startswith("not answered")
    assert all(not e["destinations"]["primary"]["verified_by_c_find"] for e in receipt["files"])


def test_verify_c_find_required_keeps_files_when_the_pacs_cannot_answer(
        site: Site, storescp: StoreSCP) -> None:
    use(site, storescp)
    site.env["PACS_VERIFY"] = "c-find"
    make_patient_folder(site.import_dir, "#65-Must^Verify", 2, rows=16)
    result = site.run()
    assert result.returncode == 1
    assert "not yet verified" in result.stderr
    assert site.archived() == {} and len(site.remaining()) == 2
    site.env["PACS_VERIFY"] = "none"
    assert site.run().returncode == 0
    assert len(site.archived()) == 2


def test_an_instance_already_in_the_pacs_is_not_sent_again(site: Site, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", tcp_nodelay=True)
    use(site, pacs)  # not started: the first run finds it down
    files = make_patient_folder(site.import_dir, "#66-Lost^Ack", 3, rows=16)
    assert site.run().returncode == 1  # stamped, not delivered
    sends_before = len(tool_calls(site, "storescu"))
    with pacs:
        # It arrives by another way (say, the ack of an earlier send was lost).
        subprocess.run(["storescu", "-aec", pacs.aet, pacs.host, str(pacs.port),
                        *map(str, files)], check=True, capture_output=True)
        result = site.run()
        assert pacs.count_instances() == 3
    assert result.returncode == 0, result.stderr
    assert len(tool_calls(site, "storescu")) == sends_before, "nothing was sent again"
    assert len(site.archived()) == 3
    entry = receipt_of(site, "#66-Lost^Ack")["files"][0]["destinations"]["primary"]
    assert entry["verified_by_c_find"] is True
    assert entry["c_store_status"] == "already in the PACS (C-FIND)"
