"""`watch`'s side of an outage (the decisions are outage.py's, pure): it says what happened,
asks a destination that is down by C-ECHO when its turn comes, counts what waits, and makes
the parked folders due the moment the destination answers."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from importer import dcmtk, history
from importer.config import Settings
from importer.journal import Journal
from importer.logs import event, warn
from importer.outage import Outages, duration
from importer.pipeline import BatchReport
from importer.snapshot import list_files


class Downtime:
    def __init__(self, settings: Settings, hurry: Callable[[str], None]) -> None:
        self.settings = settings
        self.hurry = hurry  # makes a folder due now
        self.outages = Outages(settings.probe_interval)
        self.required = {d.name: d for d in settings.destinations if d.required}
        self.marked_hour: int | None = None  # the last hour marked down in the history

    def nowhere_to_send(self) -> bool:
        """Every required destination is down: folders that fall due can only wait."""
        return self.outages.waits_only_for_down(set(self.required))

    def unavailable(self) -> dict[str, str]:
        """Destinations not to send to now -> since when, in words (for run_batch)."""
        return {name: f"down since {time.strftime('%H:%M', time.localtime(o.since))}"
                for name, o in self.outages.unavailable().items()}

    def park(self, folders: list[str]) -> None:
        """These folders wait for the destinations that are down (any of them answering
        makes them due: the journal knows which ones they still need)."""
        for name in self.outages.down:
            self.outages.park(name, folders)

    def any_down(self) -> bool:
        return bool(self.outages.down)

    def seconds_until_next(self) -> float | None:
        return self.outages.seconds_until_next()

    def after_batch(self, report: BatchReport) -> None:
        """One story per outage: a line when a destination goes down, one when it is back."""
        for name, why in report.unreachable.items():
            if name in report.reached or name not in self.required:
                continue  # an optional destination never holds a file back
            label = self.required[name].label
            was = self.outages.down.get(name)
            misled = was is not None and was.trying
            if self.outages.failed(name, why):
                warn("%s is down: %s; files wait for it, and it is asked by C-ECHO every %d s",
                     label, why, self.settings.probe_interval)
            elif misled and self.outages.down[name].misled == 1:
                warn("%s answers C-ECHO but still takes no files: %s; it is asked less often"
                     " (next in %d s)", label, why,
                     self.outages.down[name].next_probe - time.monotonic())
        for name in report.reached:
            if (outage := self.outages.reached(name)) is None:
                continue
            for folder in outage.folders:  # parked while the probe's batch ran
                self.hurry(folder)
            if not outage.trying:
                event("INFO", "%s takes files again after %s", self.required[name].label,
                      duration(self.outages.lasted(outage)))

    def probe(self) -> None:
        """C-ECHO each destination that is down when its turn comes; when it answers, every
        folder waiting for it is due at once (oldest first); an hourly reminder while not."""
        for name in self.outages.probes_due():
            destination = self.required[name]
            try:
                answered = dcmtk.echo_reached(dcmtk.echo(destination))
            except (dcmtk.DcmtkMissing, dcmtk.Stopped):
                return
            if not answered:
                self._mark_hour()
            outage = self.outages.down[name]
            folders = self.outages.probed(name, answered)
            if answered:
                event("INFO", "%s answers again after %s: sending %d files in %d folders",
                      destination.label, duration(self.outages.lasted(outage)),
                      self._files_in(folders), len(folders))
                for folder in folders:
                    self.hurry(folder)
        for name in self.outages.reminders_due():
            outage = self.outages.down[name]
            warn("%s still down since %s (%s): %d files in %d folders wait for it; last: %s",
                 self.required[name].label,
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(outage.since)),
                 duration(self.outages.lasted(outage)), self._files_in(outage.folders),
                 len(outage.folders), outage.reason)

    def _mark_hour(self) -> None:
        """The status page's chart marks the hours a destination is down: once an hour,
        from the journal's failure times, while its folders are parked."""
        hour = int(time.time() // 3600)
        if hour == self.marked_hour:
            return
        self.marked_hour = hour
        journal = Journal(self.settings.state_dir)
        try:
            known = journal.destinations()
        finally:
            journal.close()
        try:
            history.mark_down(self.settings.state_dir, known)
        except (sqlite3.Error, OSError) as exc:
            warn("Cannot mark the status page's down hours: %s", exc)

    def _files_in(self, folders: Iterable[str]) -> int:
        return sum(len(list_files(Path(self.settings.import_dir) / f)[0]) for f in folders)
