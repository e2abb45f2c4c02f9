"""`importer watch`: inotify on the import dir; quiet folders go through the pipeline.

Events only say *which top-level folder* had activity: the pipeline lists the folder
afresh when it runs, so no per-file state is kept here and no event can be "missed" for
a file as long as its folder is touched again — by an event, by the scan of a new
directory (files can land before its watch exists), by a queue-overflow rescan or by the
periodic rescan for shares that drop events. Idle means blocked in ``select`` on the
inotify descriptor and a signal pipe: no polling.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from pathlib import Path

from inotify_simple import INotify, flags

from importer import alerts, dcmtk, logs
from importer.audit import audit_all
from importer.config import Settings
from importer.debounce import QuietTimers
from importer.folders import display, mask_names, parse_folder_name
from importer.journal import Journal
from importer.logs import event, warn
from importer.outage import Outages, duration
from importer.pipeline import BatchReport, run_batch
from importer.retention import prune, seconds_until_daily
from importer.snapshot import list_files, scan_import_dir, warn_unmatched
from importer.web import StatusPage

# MODIFY too: a long write shows only MODIFY events between CREATE and CLOSE_WRITE, and a
# quiet period must not run out in the middle of it. Events cost no log line.
WATCH_MASK = (flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE | flags.MODIFY
              | flags.MOVED_FROM | flags.DELETE | flags.DELETE_SELF)
HEARTBEAT_SECONDS = 30.0


class Watcher:
    def __init__(self, settings: Settings, *, rescan_seconds: float = 300.0) -> None:
        self.settings = settings
        self.root = str(settings.import_dir)
        self.rescan_seconds = rescan_seconds
        self.timers = QuietTimers(settings.delay)
        self.inotify = INotify()
        self.watches: dict[int, str] = {}  # watch descriptor -> directory
        self.watch_limit_hit = False
        self.quiet_unmatched: set[str] = set()
        self.seen: dict[str, int] = {}  # held folder -> fingerprint of its files when held
        self.held_watch: int | None = None  # inotify on STATE_DIR/held: releases
        self.retrying: set[str] = set()
        self.noted_writing: set[str] = set()  # files already reported as still being written
        self.last_prune: float | None = None
        self.last_audit = time.monotonic()  # the first audit one interval after start
        self.page: StatusPage | None = None
        self.alerter: alerts.Alerter | None = None
        self.destination_watch = alerts.DestinationWatch(settings.alert_after)
        self.checked_destinations = 0.0
        self.outages = Outages(settings.probe_interval)
        self.heartbeat = settings.state_dir / "heartbeat"
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False

    # --- lifecycle ----------------------------------------------------------------------

    def run(self) -> None:
        """Watch until SIGTERM/SIGINT; return once everything in flight is settled."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        try:
            event("Watcher", "Watching %s (DELAY %d s, rescan every %d s)", self.root,
                  self.settings.delay, self.rescan_seconds)
            self._start_operator_views()
            self._watch_releases()
            self._add_tree(self.root)
            self.rescan(startup=True)
            next_rescan = time.monotonic() + self.rescan_seconds
            while not self._stop:
                self._beat()
                self._check_destinations()
                self._check_releases()
                self._probe_down_destinations()
                if seconds_until_daily(self.last_prune) == 0:
                    self._prune()
                audit_period = self.settings.audit_interval_days * 86400.0
                if audit_period and seconds_until_daily(self.last_audit,
                                                        period=audit_period) == 0:
                    self._audit()
                timeout = min(HEARTBEAT_SECONDS, max(0.0, next_rescan - time.monotonic()),
                              seconds_until_daily(self.last_prune))
                for pending in (self.timers.seconds_until_next(),
                                self.outages.seconds_until_next()):
                    if pending is not None:
                        timeout = min(timeout, pending)
                self._wait(timeout)
                if self._stop:
                    break
                if time.monotonic() >= next_rescan:
                    self.rescan()
                    next_rescan = time.monotonic() + self.rescan_seconds
                # Up to a tenth of DELAY early (at most 1 s): folders of one burst share a batch.
                due = self.timers.due(slack=min(1.0, self.settings.delay / 10))
                if due:
                    self._process(due)
        finally:
            if self.page is not None:
                self.page.stop()
            if self.alerter is not None:
                self.alerter.stop()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.inotify.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
        event("Watcher", "Stopped")

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self._stop:
            event("Watcher", "%s received: stopping", signal.Signals(signum).name)
        self._stop = True
        dcmtk.request_stop()

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

    def _start_operator_views(self) -> None:
        """The status page (STATUS_LISTEN) and alerts (ALERT_WEBHOOK), apart from this loop."""
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

    # --- destinations that are down (outage.py) -------------------------------------------

    def _note_destinations(self, report: BatchReport) -> None:
        """One story per outage: a line when a destination goes down, one when it is back."""
        labels = {d.name: d.label for d in self.settings.destinations if d.required}
        for name, why in report.unreachable.items():
            if name in report.reached or name not in labels:
                continue  # an optional destination never holds a file back
            was = self.outages.down.get(name)
            misled = was is not None and was.trying
            if self.outages.failed(name, why):
                warn("%s is down: %s; files wait for it, and it is asked by C-ECHO every %d s",
                     labels[name], why, self.settings.probe_interval)
            elif misled and self.outages.down[name].misled == 1:
                warn("%s answers C-ECHO but still takes no files: %s; it is asked less often"
                     " (next in %d s)", labels[name], why,
                     self.outages.down[name].next_probe - time.monotonic())
        for name in report.reached:
            if (outage := self.outages.reached(name)) is None:
                continue
            for folder in outage.folders:  # parked while the probe's batch ran
                self.timers.hurry(folder)
            if not outage.trying:
                event("INFO", "%s takes files again after %s", labels.get(name, name),
                      duration(time.time() - outage.since))

    def _probe_down_destinations(self) -> None:
        """C-ECHO each destination that is down when its turn comes; when it answers, every
        folder waiting for it is due at once (oldest first); an hourly reminder while not."""
        by_name = {d.name: d for d in self.settings.destinations}
        for name in self.outages.probes_due():
            destination = by_name[name]
            try:
                answered = dcmtk.echo(destination).exit_code == 0
            except (dcmtk.DcmtkMissing, dcmtk.Stopped):
                return
            outage = self.outages.down[name]
            folders = self.outages.probed(name, answered)
            if answered:
                files = sum(len(list_files(Path(self.root) / f)[0]) for f in folders)
                event("INFO", "%s answers again after %s: sending %d files in %d folders",
                      destination.label, duration(time.time() - outage.since), files,
                      len(folders))
                for folder in folders:
                    self.timers.hurry(folder)
        for name in self.outages.reminders_due():
            outage = self.outages.down[name]
            files = sum(len(list_files(Path(self.root) / f)[0]) for f in outage.folders)
            warn("%s still down since %s (%s): %d files in %d folders wait for it; last: %s",
                 by_name[name].label, time.strftime("%Y-%m-%d %H:%M",
                                                    time.localtime(outage.since)),
                 duration(time.time() - outage.since), files, len(outage.folders),
                 outage.reason)

    def _watch_releases(self) -> None:
        """`importer release` writes to the held folder's note: seen at once."""
        held = self.settings.state_dir / "held"
        try:
            held.mkdir(parents=True, exist_ok=True)
            self.held_watch = self.inotify.add_watch(held, flags.CLOSE_WRITE)
        except OSError as exc:
            warn("Cannot watch %s for releases (checked every %d s instead): %s", held,
                 HEARTBEAT_SECONDS, exc.strerror)

    def _check_releases(self) -> None:
        """A held folder a person released (`importer release`, another process) is due at
        once: it is otherwise not looked at again until its files change."""
        if not self.seen or not (self.settings.state_dir / "journal.sqlite3").exists():
            return
        journal = Journal(self.settings.state_dir)
        try:
            released = journal.released() & set(self.seen)
        finally:
            journal.close()
        for name in released:
            del self.seen[name]
            event("Waiter", "%s was released: processing it", self._label(name))
            self._touch(name, at=time.monotonic() - self.settings.delay)

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

    # --- waiting and events ---------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        """Block in the kernel until an event, a signal or the timeout."""
        try:
            readable, _, _ = select.select([self.inotify.fileno(), self._wake_read], [], [],
                                           timeout)
        except InterruptedError:
            return
        if self._wake_read in readable:
            while True:
                try:
                    if not os.read(self._wake_read, 512):
                        break
                except BlockingIOError:
                    break
        if self.inotify.fileno() in readable:
            self.handle_events(self.inotify.read(timeout=0))

    def handle_events(self, events: list, *, ignore: frozenset[str] = frozenset()) -> None:
        """Touch the top-level folder of each event (except those in ignore)."""
        touched: set[str] = set()
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:
                warn("inotify queue overflowed: rescanning %s", self.root)
                self.rescan()
                continue
            if ev.mask & flags.IGNORED:
                self.watches.pop(ev.wd, None)
                continue
            if ev.wd == self.held_watch:
                self._check_releases()
                continue
            directory = self.watches.get(ev.wd)
            if directory is None:
                continue
            path = os.path.join(directory, ev.name) if ev.name else directory
            if ev.mask & flags.ISDIR and ev.mask & (flags.CREATE | flags.MOVED_TO):
                self._add_tree(path)  # files may have landed before this watch existed
            top = self._top_level(path)
            if top is not None and top not in ignore:
                touched.add(top)
        for top in touched:
            self._touch(top)

    def _touch(self, top: str, at: float | None = None) -> None:
        if self.timers.touch(top, at) and at is None:
            event("Waiter", "Timer has been reset: %s (processing after %d s of quiet)",
                  self._label(top), self.settings.delay)

    def _label(self, folder_name: str) -> str:
        """The folder as logs may show it: with LOG_PATIENT_NAMES=false, without the name."""
        return mask_names(display(folder_name), self.settings.folder_pattern,
                          self.settings.log_patient_names)

    def _top_level(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.root)
        if rel in (".", "") or rel.startswith(".."):
            return None
        top = rel.split(os.sep, 1)[0]
        return None if top.startswith((".", "@")) else top

    # --- watches and scans ------------------------------------------------------------------

    def _add_tree(self, top: str) -> None:
        for dirpath, dirnames, _files in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not (dirpath == self.root
                                                       and d.startswith((".", "@")))]
            if self.watch_limit_hit:
                return
            try:
                wd = self.inotify.add_watch(dirpath, WATCH_MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self.watch_limit_hit = True
                    warn("inotify watch limit reached (fs.inotify.max_user_watches); new files"
                         " are found by rescans every %d s instead", self.rescan_seconds)
                    return
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone already
                raise
            self.watches[wd] = dirpath

    def rescan(self, *, startup: bool = False) -> None:
        """Consider every folder with something new: due at (newest file + DELAY), so
        folders that have been quiet long enough go at once."""
        if not startup:
            self._add_tree(self.root)
        now_wall, now_mono = time.time(), time.monotonic()
        matched, unmatched = scan_import_dir(self.settings)
        warn_unmatched(unmatched, self.quiet_unmatched)
        pending = self.timers.pending()
        for name, _patient in matched:
            if name in pending:
                continue
            newest, fingerprint = scan_folder(Path(self.root) / name)
            if newest is None or self.seen.get(name) == fingerprint:
                continue  # empty, or nothing new since it was last processed
            age = max(0.0, now_wall - newest)
            self._touch(name, at=now_mono - age)
            if startup:
                event("Watcher", "Found %s (newest file %d s old)", self._label(name), age)

    # --- processing -------------------------------------------------------------------------

    def _process(self, due: list[str]) -> None:
        names = []
        for name in due:
            if parse_folder_name(name, self.settings.folder_pattern) is None:
                continue
            newest, fingerprint = scan_folder(Path(self.root) / name)
            if newest is None:
                continue  # archived or removed meanwhile
            if name not in self.retrying and self.seen.get(name) == fingerprint:
                continue  # a held folder nobody has changed
            names.append(name)
        if not names:
            return
        for name in names:
            event("Waiter", "Quiet for %d s: processing %s", self.settings.delay,
                  self._label(name))
        required = {d.name for d in self.settings.destinations if d.required}
        if self.outages.waits_only_for_down(required):
            # Nowhere to send them: they wait for the first destination that answers, without
            # a batch (and its lines) per folder per retry.
            for name in self.outages.down:
                self.outages.park(name, names)
            return
        down = {name: f"down since {time.strftime('%H:%M', time.localtime(o.since))}"
                for name, o in self.outages.unavailable().items()}
        with logs.batch_log(self.settings.log_dir):
            try:
                report = run_batch(self.settings, quiet_unmatched=self.quiet_unmatched,
                                   only=set(names), noted_writing=self.noted_writing,
                                   down=down)
            except dcmtk.Stopped:
                return
            except (OSError, dcmtk.DcmtkMissing) as exc:
                logs.error("Batch stopped: %s; retrying later", exc)
                for name in names:
                    self.retrying.add(name)
                    self.timers.failed(name)
                return
        # Events queued while the batch ran are mostly our own renames; what really arrived
        # meanwhile is found by the scan below, which runs after this drain.
        self.handle_events(self.inotify.read(timeout=0), ignore=frozenset(names))
        self._note_destinations(report)
        for name in names:
            newest, fingerprint = scan_folder(Path(self.root) / name)
            folder = next((f for f in report.folders if f.name == name), None)
            self.seen.pop(name, None)
            if newest is None:
                self.retrying.discard(name)
                self.timers.succeeded(name)
            elif folder is not None and folder.pending and self.outages.down:
                # It waits for a destination that is down: due again when that answers.
                self.retrying.add(name)
                for down_name in self.outages.down:
                    self.outages.park(down_name, [name])
            elif name in report.busy or (folder is not None and folder.pending):
                self.retrying.add(name)
                wait = self.timers.failed(name)
                event("Waiter", "%s: files remain; retrying in %d s", self._label(name), wait)
            elif folder is not None and folder.held:
                self.retrying.discard(name)
                self.seen[name] = fingerprint  # wait for a person to change something
            else:
                # Files that arrived while the batch ran, or are still being written: they
                # get a quiet period of their own (new events extend it).
                self.retrying.discard(name)
                self.timers.succeeded(name)
                self._touch(name, at=time.monotonic() if folder and folder.writing else None)


def scan_folder(top: Path) -> tuple[float | None, int]:
    """Newest modification time of the files the pipeline would take from top (None: no
    such file) and a fingerprint of them all, to tell whether anything changed."""
    files, _left = list_files(top)
    if not files:
        return None, 0
    newest = max(f.mtime_ns for f in files) / 1e9
    return newest, hash(tuple(sorted((f.path, f.size, f.mtime_ns) for f in files)))
