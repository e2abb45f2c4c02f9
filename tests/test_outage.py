"""After an outage (issue 22): a destination that is down is asked by C-ECHO, and the backlog
goes the moment it answers, with one story per outage in the logs.

The long outages run on an injected clock (importer/outage.py, importer/debounce.py are pure);
the real ones run `importer watch` against storescp and a pynetdicom SCP that answers C-ECHO
but takes no files.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from importer.debounce import QuietTimers
from importer.outage import REMIND_EVERY, Outages, duration
from simsite.dicomgen import make_patient_folder
from simsite.receivers import StoreSCP, free_port
from simsite.refusing_scp import RefusingSCP
from simsite.site import Site, Watching, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_longer_than_the_backoff_cap_drains_within_one_probe_interval() -> None:
    clock = Clock()
    timers = QuietTimers(180, clock=clock)
    outages = Outages(30, clock=clock, wall=clock)
    # A folder that arrived at the start of a two-hour maintenance window: per folder it
    # would be tried 3, 6, 12, 24, 48, 96 and 156 minutes after it arrived (36 min late).
    timers.touch("#1-A^B")
    clock.now += 180
    assert timers.due() == ["#1-A^B"]
    assert outages.failed("primary", "Connection refused") is True
    outages.park("primary", ["#1-A^B"])
    probes = 0
    for _ in range(int(2 * 3600 / 30)):  # two hours of probes that get no answer
        clock.now += 30
        assert timers.due() == []  # parked: no per-folder retries, no lines
        for name in outages.probes_due():
            probes += 1
            assert outages.probed(name, answered=False) == []
    assert probes == 240
    back_at = clock.now + 17  # the PACS answers again between two probes
    clock.now += 30
    (name,) = outages.probes_due()
    assert outages.probed(name, answered=True) == ["#1-A^B"]
    timers.hurry("#1-A^B")
    assert timers.due() == ["#1-A^B"]
    assert clock.now - back_at <= 30  # within PROBE_INTERVAL of the PACS answering
    outage = outages.reached("primary")
    assert outage is not None and duration(outages.lasted(outage)) == "2 h 0 min"


def test_an_outage_lasts_by_the_monotonic_clock_whatever_the_wall_clock_does() -> None:
    """The wall clock set back a day while the PACS is down: "back after -86385 s" is what
    the wall clock would say; the outage lasted 15 s."""
    clock, wall = Clock(), Clock()
    outages = Outages(30, clock=clock, wall=wall)
    outages.failed("primary", "Connection refused")
    clock.now += 15
    wall.now -= 86400
    outage = outages.reached("primary")
    assert outage is not None and duration(outages.lasted(outage)) == "15 s"
    assert outage.since == 1000.0  # "down since" stays the wall time it went down


def test_probe_that_misleads_backs_off_and_reminders_are_hourly() -> None:
    clock = Clock()
    outages = Outages(30, clock=clock, wall=clock)
    outages.failed("primary", "Association Rejected")
    outages.park("primary", ["#1-A^B", "#2-C^D"])
    clock.now += 30
    assert outages.probed("primary", answered=True) == ["#1-A^B", "#2-C^D"]
    assert outages.probes_due() == []  # trying: no probe until the send says how it went
    assert outages.failed("primary", "Association Rejected") is False  # not a second "down"
    assert outages.down["primary"].misled == 1
    clock.now += 59
    assert outages.probes_due() == []
    clock.now += 1
    assert outages.probes_due() == ["primary"]  # 60 s now, then 120, ... up to an hour
    reminders = 0
    for _ in range(int(5 * 3600 / 60)):
        clock.now += 60
        reminders += len(outages.reminders_due())
    assert reminders == 5 and REMIND_EVERY == 3600


# --- real receivers ------------------------------------------------------------------------


def log_text(site: Site) -> str:
    return (site.log_dir / "log.log").read_text(encoding="utf-8")


def console_lines(site: Site, needle: str, since: int = 0) -> int:
    """Console-level records (INFO and above) whose message holds needle, from line since."""
    return sum(1 for line in log_text(site).splitlines()[since:]
               if (record := json.loads(line))["level"] in ("INFO", "WARNING", "ERROR")
               and needle in record["message"])


@pytest.fixture
def down_port() -> int:
    return free_port()


def test_watch_drains_the_backlog_once_the_pacs_answers_with_one_story(
        site: Site, tmp_path: Path, down_port: int) -> None:
    site.env |= {"PACS_SERVER_PORT": str(down_port), "PROBE_INTERVAL": "2"}
    for k in range(1, 6):
        make_patient_folder(site.import_dir, f"#{700 + k}-Wait^Ing", 2, rows=16)
    watcher = Watching(site)
    try:
        wait_for(lambda: console_lines(site, "is down") == 1, 20)
        lines_then = len(log_text(site).splitlines())
        time.sleep(7)  # three probes that get no answer, and new files that arrive
        make_patient_folder(site.import_dir, "#706-Late^Comer", 2, rows=16)
        time.sleep(4)
        # The first batch learnt it: one line per folder then; none since.
        assert console_lines(site, ": left for retry:") == 5
        assert console_lines(site, "left for retry", since=lines_then) == 0
        with StoreSCP(tmp_path / "received", port=down_port) as pacs:
            up_at = time.monotonic()
            wait_for(lambda: site.remaining() == [], 30)
            drained = time.monotonic() - up_at
            assert len(pacs.received()) == 12
        assert drained < 2 + 5, drained  # PROBE_INTERVAL plus the send
        assert console_lines(site, ": left for retry:") == 5
    finally:
        watcher.stop()
    assert console_lines(site, "is down") == 1
    assert console_lines(site, "answers again after") == 1
    assert "sending 12 files in 6 folders" in log_text(site)
    assert len(site.archived()) == 12


def test_two_destinations_one_down_the_other_gets_everything_at_once(
        site: Site, storescp: StoreSCP, tmp_path: Path, down_port: int) -> None:
    site.use(storescp)
    site.env |= {"BACKUP_PACS_IP": "127.0.0.1", "BACKUP_PACS_PORT": str(down_port),
                 "BACKUP_PACS_AET": "BACKUP", "PROBE_INTERVAL": "2"}
    make_patient_folder(site.import_dir, "#710-Two^Places", 3, rows=16)
    watcher = Watching(site)
    try:
        wait_for(lambda: len(storescp.received()) == 3, 20)
        wait_for(lambda: console_lines(site, "is down") == 1, 10)
        time.sleep(3)
        assert site.remaining()  # waiting for the backup, which is required
        with StoreSCP(tmp_path / "backup", aet="BACKUP", port=down_port) as backup:
            wait_for(lambda: site.remaining() == [], 20)
            assert len(backup.received()) == 3
    finally:
        watcher.stop()
    assert len(storescp.received()) == 3  # not sent to the primary again


class EchoOnlySCP:
    """A PACS that answers C-ECHO but takes no files from us: it accepts the association
    with Verification only, so storescu finds no presentation context for any image."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ae = AE(ae_title="ECHOONLY")
        self.ae.add_supported_context(Verification)
        self.echoes = 0
        self.lock = threading.Lock()

    def _on_echo(self, _event: Any) -> int:
        with self.lock:
            self.echoes += 1
        return 0x0000

    def __enter__(self) -> EchoOnlySCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_ECHO, self._on_echo)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture
def echo_only() -> Iterator[EchoOnlySCP]:
    with EchoOnlySCP() as scp:
        yield scp


def test_answering_c_echo_but_refusing_files_is_not_back(site: Site,
                                                         echo_only: EchoOnlySCP) -> None:
    site.env |= {"PACS_SERVER_PORT": str(echo_only.port), "PACS_AET": "ECHOONLY",
                 "PROBE_INTERVAL": "1", "RECONCILE": "off"}
    make_patient_folder(site.import_dir, "#720-Echo^Only", 2, rows=16)
    watcher = Watching(site)
    try:
        wait_for(lambda: console_lines(site, "is down") == 1, 20)
        wait_for(lambda: console_lines(site, "answers C-ECHO but still takes no files") == 1,
                 20)
        time.sleep(4)  # probes back off: 2, 4 s ...
    finally:
        watcher.stop()
    assert console_lines(site, "takes files again") == 0
    assert console_lines(site, "answers C-ECHO but still takes no files") == 1
    assert console_lines(site, "is down") == 1
    assert echo_only.echoes <= 4
    assert len(site.remaining()) == 2


def test_a_pacs_without_the_verification_service_is_back_when_it_takes_associations(
        site: Site, down_port: int) -> None:
    """Found by the fault campaign (chaos seed 1): a PACS that takes images but offers no
    C-ECHO (pynetdicom's storage-only SCP here; some archives and cloud gateways) answered
    every probe "No Acceptable Presentation Contexts" and stayed down for ever. It accepted
    the association: it is back, and the send decides."""
    site.env |= {"PACS_SERVER_PORT": str(down_port), "PACS_AET": "REFUSER",
                 "PROBE_INTERVAL": "1", "RECONCILE": "off"}
    make_patient_folder(site.import_dir, "#801-No^Echo", 3, rows=16)
    watcher = Watching(site)
    try:
        wait_for(lambda: console_lines(site, "is down") == 1, 20)
        pacs = RefusingSCP()  # storage contexts only: C-ECHO gets no presentation context
        pacs.port = down_port
        with pacs:
            wait_for(lambda: site.remaining() == [], 20)
            assert len(pacs.accepted_uids()) == 3
    finally:
        watcher.stop()
    assert console_lines(site, "answers again after") == 1
    assert len(site.archived()) == 3
