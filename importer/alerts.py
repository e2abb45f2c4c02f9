"""Alerts to a webhook (ALERT_WEBHOOK): a file quarantined, a folder held, a destination
failing for longer than ALERT_AFTER, and its recovery.

A JSON POST `{"text": …, "event": …, "subject": …}`: Slack, Teams and Synology Chat
incoming webhooks read `text`; ntfy shows the body. Never in the pipeline's way: alerts go
to a spool file in STATE_DIR and a background thread posts them, retrying with backoff
while the webhook is down, so none is lost (not across a restart either). The same alert
for the same subject is sent at most once per ALERT_REPEAT.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from importer import logs
from importer.config import Settings

ALERT_REPEAT = 3600.0
_TIMEOUT = 10.0
_MAX_BACKOFF = 300.0


class Alerter:
    def __init__(self, settings: Settings) -> None:
        self.url = settings.alert_webhook
        self.spool = settings.state_dir / "alerts-pending.jsonl"
        self.sent_at: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        # The opener ignores http_proxy for loopback; a site proxy applies to the rest.
        self.opener = urllib.request.build_opener()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def notify(self, event: str, subject: str, text: str) -> None:
        """Queue an alert (unless the same one went out less than ALERT_REPEAT ago)."""
        now = time.time()
        with self.lock:
            last = self.sent_at.get((event, subject))
            if last is not None and now - last < ALERT_REPEAT:
                return
            self.sent_at[(event, subject)] = now
            entry = {"text": logs.redact(f"[dicom-importer] {text}"), "event": event,
                     "subject": logs.redact(subject), "time": now}
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.wake.set()

    def _run(self) -> None:
        backoff = 5.0
        failing = False
        while not self.stopping:
            pending = self._pending()
            if not pending:
                self.wake.wait(60)
                self.wake.clear()
                continue
            try:
                for entry in pending:
                    self._post(entry)
                    self._drop_first()
            except (OSError, urllib.error.URLError) as exc:
                if not failing:
                    logs.warn("Alert webhook %s failed (%s); retrying, nothing is lost",
                              _host(self.url), exc)
                failing = True
                self.wake.wait(backoff)
                self.wake.clear()
                backoff = min(_MAX_BACKOFF, backoff * 2)
                continue
            if failing:
                logs.event("INFO", "Alert webhook %s reachable again", _host(self.url))
            failing, backoff = False, 5.0

    def _post(self, entry: dict[str, Any]) -> None:
        body = json.dumps(entry, ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with self.opener.open(request, timeout=_TIMEOUT) as response:
            response.read()

    def _pending(self) -> list[dict[str, Any]]:
        with self.lock:
            try:
                lines = self.spool.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return []
        return [json.loads(line) for line in lines if line.strip()]

    def _drop_first(self) -> None:
        with self.lock:
            lines = self.spool.read_text(encoding="utf-8").splitlines(keepends=True)
            partial = self.spool.with_name(self.spool.name + ".partial")
            partial.write_text("".join(lines[1:]), encoding="utf-8")
            partial.replace(self.spool)


def _host(url: str) -> str:
    return urllib.request.urlparse(url).netloc or url


_alerter: Alerter | None = None


def configure(settings: Settings) -> Alerter | None:
    """Start posting alerts (watch) when ALERT_WEBHOOK is set."""
    global _alerter
    if settings.alert_webhook:
        _alerter = Alerter(settings)
        _alerter.start()
    return _alerter


def notify(event: str, subject: str, text: str) -> None:
    if _alerter is not None:
        _alerter.notify(event, subject, text)


class DestinationWatch:
    """Turns 'failing since' into an alert after ALERT_AFTER, and a recovery alert."""

    def __init__(self, alert_after: float) -> None:
        self.alert_after = alert_after
        self.alerted: set[str] = set()

    def check(self, destinations: dict[str, dict[str, Any]], labels: dict[str, str],
              now: float | None = None) -> None:
        now = time.time() if now is None else now
        for name, state in destinations.items():
            since = state.get("failing_since")
            label = labels.get(name, name)
            if since is not None and now - since >= self.alert_after and name not in self.alerted:
                self.alerted.add(name)
                notify("destination_failing", label,
                       f"{label} has been failing for {int((now - since) // 60)} min:"
                       f" {state.get('last_error')}; files wait for it")
            elif since is None and name in self.alerted:
                self.alerted.discard(name)
                notify("destination_recovered", label, f"{label} takes files again")
