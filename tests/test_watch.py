"""`importer watch` against a real storescp: inotify, per-folder quiet periods, signals."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from inotify_simple import Event, flags

from importer.config import load_settings
from importer.watch import Watcher
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import StoreSCP
from simsite.site import DELAY, IMPORTER, Site, Watching, wait_for  # noqa: F401


@pytest.fixture
def watching(site: Site, storescp: StoreSCP) -> Iterator[Watching]:
    site.use(storescp)
    make_patient_folder(site.import_dir, "#1-Already^There", 3, rows=16)
    watcher = Watching(site)
    try:
        yield watcher
    finally:
        if watcher.process.poll() is None:
            watcher.stop()


def patient_ids(receiver: StoreSCP) -> list[str]:
    return [ds.PatientID for ds in receiver.received_datasets()]


def test_existing_and_moved_in_folders_are_sent_and_archived(
        watching: Watching, site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    wait_for(lambda: patient_ids(storescp).count("1") == 3, 15)  # there at start-up
    make_patient_folder(tmp_path / "staging", "#2-Moved^In", 4, rows=16, subdirs=2)
    shutil.move(tmp_path / "staging" / "#2-Moved^In", site.import_dir)  # a rename: MOVED_TO
    wait_for(lambda: patient_ids(storescp).count("2") == 4, 15)
    wait_for(lambda: site.remaining() == [], 10)
    assert len(site.archived()) == 7
    assert (heartbeat := site.state_dir / "heartbeat").exists()
    assert time.time() - heartbeat.stat().st_mtime < 60
    assert watching.stop() < 5
    assert watching.process.returncode == 0
    for text in ("[Watcher] Watching", "[Waiter] Timer has been reset: #2-Moved^In",
                 "[Waiter] Quiet for 2 s: processing #2-Moved^In", "[PHASE 2]"):
        assert text in watching.output


def test_a_slow_upload_is_not_sent_early_and_does_not_hold_back_another(
        watching: Watching, site: Site, storescp: StoreSCP) -> None:
    wait_for(lambda: patient_ids(storescp).count("1") == 3, 15)
    slow = site.import_dir / "#3-Slow^Upload"
    started = time.monotonic()
    quick_seen_at = None
    for i in range(8):  # one file every 0.7 s: 5.6 s of upload, longer than DELAY
        make_ct(slow / "series" / f"{i}.dcm", rows=16)
        if i == 1:
            make_patient_folder(site.import_dir, "#4-Quick^Drop", 2, rows=16)
        if quick_seen_at is None and patient_ids(storescp).count("4") == 2:
            quick_seen_at = time.monotonic() - started
        assert "3" not in patient_ids(storescp), "sent before the upload went quiet"
        time.sleep(0.7)
    assert quick_seen_at is not None and quick_seen_at < 5.6, "held back by the upload"
    wait_for(lambda: patient_ids(storescp).count("3") == 8, 15)
    wait_for(lambda: site.remaining() == [], 10)
    watching.stop()
    # The slow folder went in one batch once quiet: one '[Waiter] Quiet' line for it.
    assert watching.output.count("Quiet for 2 s: processing #3-Slow^Upload") == 1


def test_nested_directories_created_after_start_are_seen(
        watching: Watching, site: Site, storescp: StoreSCP) -> None:
    wait_for(lambda: patient_ids(storescp).count("1") == 3, 15)
    deep = site.import_dir / "#5-Deep^Tree" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    time.sleep(0.3)  # the watches for a/, b/, c/ exist now; files land in the deepest
    make_ct(deep / "x.dcm", rows=16)
    (deep / "d").mkdir()
    make_ct(deep / "d" / "y.dcm", rows=16)
    wait_for(lambda: patient_ids(storescp).count("5") == 2, 15)
    wait_for(lambda: set(site.archived()) >= {"#5-Deep^Tree/a/b/c/x.dcm",
                                              "#5-Deep^Tree/a/b/c/d/y.dcm"}, 10)


def test_idle_watch_uses_no_cpu(watching: Watching, storescp: StoreSCP) -> None:
    wait_for(lambda: patient_ids(storescp).count("1") == 3, 15)
    time.sleep(0.5)
    before = watching.cpu_ticks()
    time.sleep(3)
    assert watching.cpu_ticks() - before <= 1  # clock ticks are 10 ms: ~0 % CPU


def test_sigterm_during_a_send_stops_promptly_and_loses_nothing(
        site: Site, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "slow", extra_args=["--sleep-during", "30"]) as slow:
        site.use(slow)
        make_patient_folder(site.import_dir, "#6-Stopped^Midway", 3, rows=16)
        watcher = Watching(site)
        wait_for(lambda: '"PHASE 2"' in (site.log_dir / "log.log").read_text(), 20)
        time.sleep(0.5)  # storescu is now blocked on the receiver
        assert watcher.stop() < 5
        assert watcher.process.returncode == 0
    assert len(site.remaining()) == 3 and site.archived() == {}
    with StoreSCP(tmp_path / "received") as receiver:
        site.use(receiver)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert patient_ids(receiver) == ["6", "6", "6"]
    assert len(site.archived()) == 3


def _watcher(site: Site) -> Watcher:
    site.env["DELAY"] = "100"
    return Watcher(load_settings({}, site.env))


def test_queue_overflow_triggers_a_full_rescan(site: Site) -> None:
    watcher = _watcher(site)
    make_patient_folder(site.import_dir, "#7-Missed^Events", 1, rows=16)
    assert watcher.timers.pending() == {}
    watcher.handle_events([Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")])
    assert list(watcher.timers.pending()) == ["#7-Missed^Events"]
    assert watcher.watches, "watches were (re)added by the rescan"


def test_watch_limit_is_a_warning_not_a_crash(site: Site,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = _watcher(site)
    make_patient_folder(site.import_dir, "#8-Many^Dirs", 1, rows=16, subdirs=3)

    def no_more_watches(path: str, mask: int) -> int:
        raise OSError(28, os.strerror(28))  # ENOSPC: fs.inotify.max_user_watches reached

    monkeypatch.setattr(watcher.inotify, "add_watch", no_more_watches)
    watcher.rescan()
    assert watcher.watch_limit_hit
    assert list(watcher.timers.pending()) == ["#8-Many^Dirs"], "rescans still find it"


def test_watch_keeps_patient_names_out_of_its_logs(site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    site.env["LOG_PATIENT_NAMES"] = "false"
    make_patient_folder(site.import_dir, "#9-홍길동", 2, rows=16)
    watcher = Watching(site)
    wait_for(lambda: patient_ids(storescp).count("9") == 2, 15)
    wait_for(lambda: site.remaining() == [], 10)
    watcher.stop()
    assert "Quiet for 2 s: processing #9-***" in watcher.output
    assert "홍길동" not in watcher.output
    assert "홍길동" not in (site.log_dir / "log.log").read_text(encoding="utf-8")
    assert {str(ds.PatientName) for ds in storescp.received_datasets()} == {"홍길동"}
