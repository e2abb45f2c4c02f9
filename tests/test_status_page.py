"""Operators see and are told (issue #14): the status page, /metrics and /healthz served by a
running `importer watch` against a real storescp, in a real browser where one is installed;
its token, escaping, traversal and idle clients; alerts to a local webhook receiver."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from importer.alerts import DestinationWatch
from simsite.dicomgen import make_ct, make_patient_folder, truncated_copy
from simsite.receivers import StoreSCP, free_port
from simsite.site import IMPORTER, Site, wait_for

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HOSTILE = "#1-<img src=x onerror=alert(1)>"  # a folder name is user input


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


class Watching:
    def __init__(self, site: Site, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [IMPORTER, "watch", "--rescan", "60"],
            env={**site.env, "DELAY": "1", "STATUS_LISTEN": f"127.0.0.1:{self.port}", **env},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        wait_for(lambda: get(self.url + "/healthz")[0] == 200 if _open(self.port) else False,
                 15)

    def stop(self) -> str:
        self.process.terminate()
        return self.process.communicate(timeout=30)[0]


def _open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def busy_site(site: Site, tmp_path: Path) -> Iterator[tuple[Site, StoreSCP]]:
    """A site with something of everything: an archived folder, a quarantined file, a held
    folder and a hostile unmatched folder name."""
    with StoreSCP(tmp_path / "received") as storescp:
        site.use(storescp)
        make_patient_folder(site.import_dir, "#11-Doe^Jane", 3, rows=16)
        bad = site.import_dir / "#12-Cut^Short"
        make_ct(tmp_path / "whole.dcm", rows=32)
        truncated_copy(tmp_path / "whole.dcm", bad / "cut.dcm", 1500)
        make_ct(site.import_dir / "#13-Two^People" / "a.dcm", rows=16, birth_date="19500101")
        make_ct(site.import_dir / "#13-Two^People" / "b.dcm", rows=16, birth_date="19800101")
        (site.import_dir / HOSTILE).mkdir()
        assert site.run().returncode == 1
        yield site, storescp


def test_page_metrics_and_healthz_match_status_json(busy_site: tuple[Site, StoreSCP]) -> None:
    site, _storescp = busy_site
    watching = Watching(site)
    try:
        make_patient_folder(site.import_dir, "#14-Watch^Sent", 2, rows=16)
        wait_for(lambda: any("#14-Watch^Sent" in k for k in site.archived()), 20)
        status = json.loads(site.run("status", "--json").stdout)
        code, page = get(watching.url + "/")
        assert code == 200
        assert "Doe^Jane" in page and "#13-Two^People" in page and "cut.dcm" in page
        assert "DCMTK cannot read this file" in page and "birth dates" in page
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert 'http-equiv="refresh"' in page
        receipts = re.findall(r'href="(/receipt\?path=[^"]+)"', page)
        assert len(receipts) == len(status["recent_archives"]) == 2
        code, receipt = get(watching.url + receipts[0].replace("&amp;", "&"))
        assert code == 200 and "IM00001.dcm" in receipt and "PatientID" in receipt

        code, text = get(watching.url + "/metrics")
        assert code == 200
        gauges = dict(re.findall(r"^(dicom_importer_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
        assert float(gauges["dicom_importer_quarantined_files"]) == len(status["quarantined"])
        assert float(gauges["dicom_importer_held_folders"]) == len(status["held"]) == 1
        assert float(gauges["dicom_importer_waiting_folders"]) == len(status["pending"])
        assert float(gauges['dicom_importer_files_total{destination="primary",'
                            'outcome="delivered"}']) == 2  # what this process sent
        assert 'dicom_importer_dcmtk_calls_total{tool="storescu"}' in gauges
        assert "# TYPE dicom_importer_files_total counter" in text
        assert get(watching.url + "/healthz") == (200, "ok\n")
    finally:
        watching.stop()


@pytest.mark.parametrize("path", [
    "/receipt?path=../../../../etc/passwd", "/receipt?path=/etc/passwd",
    "/receipt?path=%2e%2e/%2e%2e/state/journal.sqlite3", "/receipt?path=..",
    "/receipt", "/../../etc/passwd", "/receipt?path=" + "a" * 5000,
])
def test_no_traversal(busy_site: tuple[Site, StoreSCP], path: str) -> None:
    site, _storescp = busy_site
    watching = Watching(site)
    try:
        code, body = get(watching.url + path)
        assert code == 404, body
        assert "root:" not in body
    finally:
        watching.stop()


def test_idle_client_stalls_nothing(busy_site: tuple[Site, StoreSCP]) -> None:
    site, _storescp = busy_site
    watching = Watching(site)
    idle = [socket.create_connection(("127.0.0.1", watching.port)) for _ in range(5)]
    try:
        started = time.monotonic()
        assert get(watching.url + "/")[0] == 200
        assert time.monotonic() - started < 3
        make_patient_folder(site.import_dir, "#15-While^Idle", 1, rows=16)
        wait_for(lambda: any("#15-While^Idle" in k for k in site.archived()), 20)
    finally:
        for s in idle:
            s.close()
        watching.stop()


def test_token_required_beyond_loopback(site: Site) -> None:
    refused = site.run("watch", env={**site.env, "STATUS_LISTEN": "0.0.0.0:18088"})
    assert refused.returncode == 2 and "STATUS_TOKEN" in refused.stderr
    watching = Watching(site, STATUS_TOKEN="s3cret-token")
    try:
        assert get(watching.url + "/")[0] == 401
        assert get(watching.url + "/?token=wrong")[0] == 401
        assert get(watching.url + "/metrics")[0] == 401
        assert get(watching.url + "/?token=s3cret-token")[0] == 200
        assert get(watching.url + "/", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert get(watching.url + "/healthz")[0] == 200  # probes need no token
    finally:
        watching.stop()


def test_names_masked(busy_site: tuple[Site, StoreSCP]) -> None:
    site, _storescp = busy_site
    watching = Watching(site, LOG_PATIENT_NAMES="false")
    try:
        code, page = get(watching.url + "/")
        assert code == 200
        assert "Doe^Jane" not in page and "Two^People" not in page and "#11-***" in page
    finally:
        watching.stop()


def test_page_in_a_real_browser(busy_site: tuple[Site, StoreSCP], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium); the page is tested by HTTP")
    site, _storescp = busy_site
    watching = Watching(site)
    try:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", watching.url + "/"],
            capture_output=True, text=True, timeout=60)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "Destinations" in dom.stdout and "#11-Doe^Jane" in dom.stdout
        assert "<img src=" not in dom.stdout  # shown as text, never an element
        assert "&lt;img src=x onerror=alert(1)&gt;" in dom.stdout
    finally:
        watching.stop()


# --- alerts ----------------------------------------------------------------------------------


class Hook:
    """A local webhook receiver (Slack-style: JSON POST)."""

    def __init__(self, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_alert_reaches_a_webhook_that_was_down_once(site: Site, tmp_path: Path) -> None:
    hook_port = free_port()
    with StoreSCP(tmp_path / "received") as storescp:
        site.use(storescp)
        watching = Watching(site, ALERT_WEBHOOK=f"http://127.0.0.1:{hook_port}/hook",
                            INCOMPLETE_GRACE="0")
        try:
            make_ct(tmp_path / "whole.dcm", rows=32)
            truncated_copy(tmp_path / "whole.dcm",
                           site.import_dir / "#16-Alert^Me" / "cut.dcm", 1500)
            wait_for(lambda: bool(site.failed()), 20)
            wait_for(lambda: (site.state_dir / "alerts-pending.jsonl").exists()
                     and (site.state_dir / "alerts-pending.jsonl").read_text().strip() != "", 5)
            # its first try has failed (under load the alert thread may not have tried yet)
            log = site.log_dir / "log.log"
            wait_for(lambda: "retrying, nothing is lost" in log.read_text(), 15)
            hook = Hook(hook_port)  # the webhook comes up
            try:
                wait_for(lambda: len(hook.received) >= 1, 30)
                time.sleep(1)
                assert len(hook.received) == 1
                alert = hook.received[0]
                assert alert["event"] == "quarantined" and "#16-Alert^Me" in alert["text"]
                assert "DCMTK cannot read" in alert["text"]
            finally:
                hook.stop()
        finally:
            output = watching.stop()
    assert "Alert webhook 127.0.0.1" in output and "retrying, nothing is lost" in output


def test_destination_alert_after_and_recovery() -> None:
    sent: list[tuple[str, str, str]] = []
    import importer.alerts as alerts

    original = alerts.notify
    alerts.notify = lambda event, subject, text: sent.append((event, subject, text))
    try:
        watch = DestinationWatch(alert_after=900)
        down = {"primary": {"failing_since": 1000.0, "last_error": "Connection refused"}}
        watch.check(down, {"primary": "PACS@h:1"}, now=1000.0 + 899)
        assert sent == []
        watch.check(down, {"primary": "PACS@h:1"}, now=1000.0 + 900)
        watch.check(down, {"primary": "PACS@h:1"}, now=1000.0 + 1900)
        assert [e for e, _s, _t in sent] == ["destination_failing"]
        assert "failing for 15 min" in sent[0][2] and "Connection refused" in sent[0][2]
        watch.check({"primary": {"failing_since": None}}, {"primary": "PACS@h:1"}, now=3000.0)
        assert [e for e, _s, _t in sent] == ["destination_failing", "destination_recovered"]
    finally:
        alerts.notify = original


# --- progress on a terminal ------------------------------------------------------------------


def test_run_once_shows_progress_on_a_terminal_only(site: Site, tmp_path: Path) -> None:
    import os
    import pty

    make_patient_folder(site.import_dir, "#17-Live^Line", 30, rows=16)
    with StoreSCP(tmp_path / "received") as storescp:
        site.use(storescp)
        main, secondary = pty.openpty()
        process = subprocess.Popen([IMPORTER, "run-once"], env=site.env, stdin=subprocess.DEVNULL,
                                   stdout=secondary, stderr=secondary)
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) == 0
        os.close(main)
        text = output.decode("utf-8", "replace")
        assert "\r\x1b[K#17-Live^Line: " in text
        assert "30/30 stamped" in text and "answered" in text and "files/s" in text
        # every log line still starts on a line of its own
        assert all(line.lstrip("\r\x1b[K")[:4].isdigit() or "stamped" in line
                   for line in text.replace("\r\n", "\n").split("\n") if line.strip())

        make_patient_folder(site.import_dir, "#18-Not^A^Tty", 3, rows=16)
        piped = site.run()
        assert piped.returncode == 0
        assert "\x1b[K" not in piped.stderr and "files/s" not in piped.stderr
