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

from importer import dcmtk, logs, progress
from importer.config import Settings
from importer.debounce import QuietTimers
from importer.downtime import Downtime
from importer.folders import display, mask_names, parse_folder_name
from importer.journal import Journal
from importer.logs import event, warn
from importer.pipeline import run_batch
from importer.share import share_time
from importer.snapshot import list_files, scan_import_dir, warn_unmatched
from importer.upkeep import HEARTBEAT_SECONDS, Upkeep

# MODIFY too: a long write shows only MODIFY events between CREATE and CLOSE_WRITE, and a
# quiet period must not run out in the middle of it. Events cost no log line.
WATCH_MASK = (flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE | flags.MODIFY
              | flags.MOVED_FROM | flags.DELETE | flags.DELETE_SELF)


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
        self.upkeep = Upkeep(settings)  # heartbeat, status page, alerts, prune, audit
        self.downtime = Downtime(settings, self.timers.hurry)  # destinations that are down
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
            self.upkeep.start()
            self._watch_releases()
            self._add_tree(self.root)
            self.rescan(startup=True)
            next_rescan = time.monotonic() + self.rescan_seconds
            while not self._stop:
                self.upkeep.tick()
                self._check_releases()
                self.downtime.probe()
                timeout = min(self.upkeep.seconds_until_next(),
                              max(0.0, next_rescan - time.monotonic()))
                for pending in (self.timers.seconds_until_next(),
                                self.downtime.seconds_until_next()):
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
            self.upkeep.stop()
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
        now_wall, now_mono = share_time(self.root), time.monotonic()
        matched, unmatched = scan_import_dir(self.settings)
        warn_unmatched(unmatched, self.quiet_unmatched)
        pending = self.timers.pending()
        for name, _patient in matched:
            if name in pending:
                continue
            newest, fingerprint, _count = scan_folder(Path(self.root) / name)
            if newest is None or self.seen.get(name) == fingerprint:
                continue  # empty, or nothing new since it was last processed
            age = max(0.0, now_wall - newest)
            self._touch(name, at=now_mono - age)
            if startup:
                event("Watcher", "Found %s (newest file %d s old)", self._label(name), age)

    # --- processing -------------------------------------------------------------------------

    def _process(self, due: list[str]) -> None:
        names = []
        expected = 0  # files in them: the status page's "files left" of this batch
        for name in due:
            if parse_folder_name(name, self.settings.folder_pattern) is None:
                continue
            newest, fingerprint, count = scan_folder(Path(self.root) / name)
            if newest is None:
                continue  # archived or removed meanwhile
            if name not in self.retrying and self.seen.get(name) == fingerprint:
                continue  # a held folder nobody has changed
            names.append(name)
            expected += count
        if not names:
            return
        if self.downtime.nowhere_to_send():
            # They wait for the first destination that answers, without a batch (and its
            # lines) per folder per retry.
            self.downtime.park(names)
            return
        for name in names:
            event("Waiter", "Quiet for %d s: processing %s", self.settings.delay,
                  self._label(name))
        with logs.batch_log(self.settings.log_dir), progress.Progress(
                quiet=True, expected=expected) as live:
            progress.activate(live)
            try:
                report = run_batch(self.settings, quiet_unmatched=self.quiet_unmatched,
                                   only=set(names), noted_writing=self.noted_writing,
                                   down=self.downtime.unavailable())
            except dcmtk.Stopped:
                return
            except (OSError, dcmtk.DcmtkMissing) as exc:
                logs.error("Batch stopped: %s; retrying later", exc)
                for name in names:
                    self.retrying.add(name)
                    self.timers.failed(name)
                return
            finally:
                progress.activate(None)
        # Events queued while the batch ran are mostly our own renames; what really arrived
        # meanwhile is found by the scan below, which runs after this drain.
        self.handle_events(self.inotify.read(timeout=0), ignore=frozenset(names))
        self.downtime.after_batch(report)
        for name in names:
            newest, fingerprint, _count = scan_folder(Path(self.root) / name)
            folder = next((f for f in report.folders if f.name == name), None)
            self.seen.pop(name, None)
            if newest is None:
                self.retrying.discard(name)
                self.timers.succeeded(name)
            elif folder is not None and folder.pending and self.downtime.any_down():
                # It waits for a destination that is down: due again when that answers.
                self.retrying.add(name)
                self.downtime.park([name])
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


def scan_folder(top: Path) -> tuple[float | None, int, int]:
    """Newest modification time of the files the pipeline would take from top (None: no
    such file), a fingerprint of them all, to tell whether anything changed, and how many."""
    files, _left = list_files(top)
    if not files:
        return None, 0, 0
    newest = max(f.mtime_ns for f in files) / 1e9
    return newest, hash(tuple(sorted((f.path, f.size, f.mtime_ns) for f in files))), len(files)
