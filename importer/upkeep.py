"""What `watch` does besides importing: its heartbeat, the status page and alerts, daily
pruning, the periodic audit. Each is due by its own clock; `tick` runs what is due."""

from __future__ import annotations

import time

from importer import alerts
from importer.audit import audit_all
from importer.config import Settings
from importer.journal import Journal
from importer.logs import event, warn
from importer.retention import prune, seconds_until_daily
from importer.web import StatusPage

HEARTBEAT_SECONDS = 30.0


class Upkeep:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.last_prune: float | None = None
        self.last_audit = time.monotonic()  # the first audit one interval after start
        self.page: StatusPage | None = None
        self.alerter: alerts.Alerter | None = None
        self.destination_watch = alerts.DestinationWatch(settings.alert_after)
        self.checked_destinations = 0.0
        self.heartbeat = settings.state_dir / "heartbeat"

    def start(self) -> None:
        """The status page (STATUS_LISTEN) and alerts (ALERT_WEBHOOK), apart from the loop."""
        self.alerter = alerts.configure(self.settings)
        if self.settings.status_listen is not None:
            try:
                self.page = StatusPage(self.settings)
            except OSError as exc:
                warn("Status page: cannot listen on %s:%d: %s", *self.settings.status_listen,
                     exc.strerror)
                return
            self.page.start()
            event("Watcher", "Status page on %s", self.page.url)

    def stop(self) -> None:
        if self.page is not None:
            self.page.stop()
        if self.alerter is not None:
            self.alerter.stop()

    def tick(self) -> None:
        """Heartbeat, destination alerts, and pruning and auditing when they are due."""
        self._beat()
        self._check_destinations()
        if seconds_until_daily(self.last_prune) == 0:
            self._prune()
        audit_period = self.settings.audit_interval_days * 86400.0
        if audit_period and seconds_until_daily(self.last_audit, period=audit_period) == 0:
            self._audit()

    def seconds_until_next(self) -> float:
        return min(HEARTBEAT_SECONDS, seconds_until_daily(self.last_prune))

    def _prune(self) -> None:
        """Daily retention (replaces the old host cron lines)."""
        self.last_prune = time.monotonic()
        try:
            removed = prune(self.settings, dry_run=False)
        except OSError as exc:
            warn("Pruning old logs and archives failed: %s", exc)
            return
        for result in removed:
            item = result.item
            if result.problem:
                warn("Could not prune all of %s %s: %s", item.kind, item.path, result.problem)
            elif len(result.kept) < max(1, len(result.folders)):
                event("INFO", "Pruned %s %s (%d days old)", item.kind, item.path, item.age_days)
        unchecked = [why for result in removed for _folder, why in result.unchecked]
        if unchecked:
            event("INFO", "%d archived folders pruned without asking a PACS: %s",
                  len(unchecked), unchecked[0])

    def _check_destinations(self) -> None:
        """A destination failing for longer than ALERT_AFTER, or back: an alert."""
        if self.alerter is None or time.monotonic() - self.checked_destinations < 30:
            return
        self.checked_destinations = time.monotonic()
        if not (self.settings.state_dir / "journal.sqlite3").exists():
            return
        journal = Journal(self.settings.state_dir)
        try:
            known = journal.destinations()
        finally:
            journal.close()
        self.destination_watch.check(known, {d.name: d.label for d in self.settings.destinations})

    def _audit(self) -> None:
        """Every AUDIT_INTERVAL_DAYS: does each PACS still hold every archived instance?"""
        self.last_audit = time.monotonic()
        found = audit_all(self.settings)
        lacking = [result for result in found if not result.intact]
        for result in lacking:
            warn("Audit: %s: %s", result.folder, result.may_delete("auto")[1])
        event("INFO", "Audit: %d archived folders, %d with instances missing at a PACS",
              len(found), len(lacking))

    def _beat(self) -> None:
        try:
            self.heartbeat.touch()
        except OSError as exc:
            warn("Cannot touch heartbeat %s: %s", self.heartbeat, exc.strerror)
