"""Operator commands: check, status, prune, retry — against real tools and receivers."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

from simsite.dicomgen import make_ct, truncated_copy
from simsite.receivers import StoreSCP, free_port
from simsite.site import Site


def test_check_passes_and_names_the_destination_that_does_not_answer(
        site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    result = site.run("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok    C-ECHO STORESCP@127.0.0.1:{storescp.port} (primary, required)" in result.stdout
    assert "ok    tool storescu: " in result.stdout and "v3.6" in result.stdout
    dead_port = free_port()
    site.env |= {"BACKUP_PACS_IP": "127.0.0.1", "BACKUP_PACS_PORT": str(dead_port),
                 "BACKUP_PACS_AET": "BACKUP"}
    result = site.run("check")
    assert result.returncode == 1
    assert f"FAIL  C-ECHO BACKUP@127.0.0.1:{dead_port}" in result.stdout
    assert "Connection refused" in result.stdout
    assert f"check failed: C-ECHO BACKUP@127.0.0.1:{dead_port}" in result.stderr


def test_status_lists_pending_unmatched_quarantined_and_destinations(
        site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    folder = site.import_dir / "#20-Status^Check"
    make_ct(folder / "good.dcm", rows=16)
    make_ct(folder / "whole.dcm", rows=32)
    truncated_copy(folder / "whole.dcm", folder / "cut.dcm", 1500)
    (folder / "whole.dcm").unlink()
    (site.import_dir / "not a patient").mkdir()
    assert site.run().returncode == 1  # cut.dcm quarantined
    make_ct(site.import_dir / "#21-Waiting^Folder" / "a.dcm", rows=16)

    result = site.run("status", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [p["folder"] for p in report["pending"]] == ["#21-Waiting^Folder"]
    assert report["pending"][0]["files"] == 1 and report["pending"][0]["due_in_s"] > 100
    assert report["unmatched"] == ["not a patient"]
    (quarantined,) = report["quarantined"]
    assert quarantined["file"].endswith("#20-Status^Check/cut.dcm")
    assert "DCMTK cannot read this file" in quarantined["reason"]
    (destination,) = report["destinations"]
    assert destination["destination"] == f"STORESCP@127.0.0.1:{storescp.port}"
    assert destination["last_success"] is not None and destination["last_failure"] is None
    text = site.run("status").stdout
    assert "#21-Waiting^Folder: 1 files" in text and "Quarantined files: 1" in text


def test_prune_is_a_dry_run_unless_confirmed_and_only_removes_our_old_batches(
        site: Site) -> None:
    now = datetime.now()
    old, recent = now - timedelta(days=120), now - timedelta(days=10)
    for when in (old, recent):
        batch = site.archive_dir / when.strftime("%Y%m%d_%H%M%S") / "#1-A"
        batch.mkdir(parents=True)
        (batch / "a.dcm").write_bytes(b"x")
        site.log_dir.mkdir(exist_ok=True)
        (site.log_dir / when.strftime("%Y%m%d-%H%M%S.log")).write_text("{}\n")
    (site.log_dir / "log.log").write_text("{}\n")
    (site.archive_dir / "keep-me").mkdir()
    (site.failed_dir / old.strftime("%Y%m%d_%H%M%S")).mkdir(parents=True)

    dry = site.run("prune")
    assert dry.returncode == 0
    assert dry.stdout.count("would delete") == 2 and "dry run" in dry.stdout
    assert len(list(site.archive_dir.iterdir())) == 3

    real = site.run("prune", "--yes")
    assert real.returncode == 0 and real.stdout.count("deleted") == 2
    assert sorted(p.name for p in site.archive_dir.iterdir()) == sorted(
        ["keep-me", recent.strftime("%Y%m%d_%H%M%S")])
    assert not (site.log_dir / old.strftime("%Y%m%d-%H%M%S.log")).exists()
    assert (site.log_dir / recent.strftime("%Y%m%d-%H%M%S.log")).exists()
    assert (site.log_dir / "log.log").exists()
    assert any(site.failed_dir.iterdir()), "quarantine is never pruned"


def test_retry_puts_quarantined_files_back(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    folder = site.import_dir / "#22-Retry^Me"
    make_ct(folder / "sub" / "whole.dcm", rows=32)
    truncated_copy(folder / "sub" / "whole.dcm", folder / "sub" / "cut.dcm", 1500)
    (folder / "sub" / "whole.dcm").unlink()
    assert site.run().returncode == 1
    (quarantined,) = site.failed().values()
    batch = Path(*quarantined.parts[: len(site.failed_dir.parts) + 1])

    result = site.run("retry", str(batch))

    assert result.returncode == 0, result.stderr
    assert "1 files put back" in result.stdout
    assert site.remaining() == ["#22-Retry^Me/sub/cut.dcm"]
    assert site.failed() == {} and not list(site.failed_dir.rglob("*.reason.txt"))
    outside = site.run("retry", str(site.import_dir))
    assert outside.returncode == 2 and "not inside FAILED_DIR" in outside.stderr


def test_status_lists_held_folders_until_they_are_sorted_out(site: Site,
                                                            storescp: StoreSCP) -> None:
    site.use(storescp)
    folder = site.import_dir / "#23-Two^People"
    make_ct(folder / "cd1.dcm", rows=16, birth_date="19500101")
    make_ct(folder / "cd2.dcm", rows=16, birth_date="19800505")
    assert site.run().returncode == 1
    (held,) = json.loads(site.run("status", "--json").stdout)["held"]
    assert held["folder"] == "#23-Two^People" and "birth dates" in held["reason"]
    assert "Held (identity conflict or two patients" in site.run("status").stdout
    (folder / "cd2.dcm").unlink()  # a person took the second CD out
    assert site.run().returncode == 0
    assert json.loads(site.run("status", "--json").stdout)["held"] == []


def test_prune_goes_on_past_what_it_cannot_delete(site: Site) -> None:
    """The old scripts ran as root: their archives may not be ours to delete."""
    old = datetime.now() - timedelta(days=200)
    stuck_batch = site.archive_dir / old.strftime("%Y%m%d_%H%M%S") / "#1-A"
    other_batch = site.archive_dir / (old + timedelta(seconds=1)).strftime("%Y%m%d_%H%M%S")
    stuck_batch.mkdir(parents=True)
    other_batch.mkdir(parents=True)
    stuck = stuck_batch / "a.dcm"
    stuck.write_bytes(b"x")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # undeletable, even by root
    try:
        result = site.run("prune", "--yes")
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    assert result.returncode == 1
    assert "could not delete all of archive" in result.stderr and "a.dcm" in result.stderr
    assert not other_batch.exists(), "the next batch was still pruned"
    assert stuck.exists()


def test_the_old_scripts_plain_text_log_is_kept_aside_not_mixed(site: Site,
                                                                 storescp: StoreSCP) -> None:
    site.use(storescp)
    site.log_dir.mkdir()
    (site.log_dir / "log.log").write_text("[Watcher] Lock acquired\n[PHASE 1] ...\n")
    make_ct(site.import_dir / "#24-Old^Log" / "a.dcm", rows=16)
    assert site.run().returncode == 0
    (old,) = site.log_dir.glob("log.log.scripts-*")
    assert old.read_text().startswith("[Watcher] Lock acquired")
    records = site.log_records()  # every line of the new log.log is JSON
    assert records and all(isinstance(r, dict) for r in records)
    assert site.run().returncode == 0
    assert len(list(site.log_dir.glob("log.log.scripts-*"))) == 1, "set aside once"
