"""Progress on a terminal: `run-once` on a TTY keeps one live line for the folder being
sent (files stamped / answered / listed of total, files per second, ETA). When stderr is
not a terminal nothing extra is written: logs stay as they are. `watch` counts the same
without drawing (quiet), for the status page: a backlog's files left, rate and ETA.

The console log handler clears the line before it writes a record and redraws it after
(logs.console_around), so log lines and the live line never mix.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from importer import logs
from importer.folders import display


@dataclass
class _Folder:
    label: str
    total: int
    stamped: int = 0
    answered: int = 0
    listed: int = 0
    started: float = field(default_factory=time.monotonic)


def line(folder: _Folder, now: float) -> str:
    """The live line (pure: the clock is given)."""
    elapsed = max(now - folder.started, 1e-6)
    rate = folder.answered / elapsed
    left = folder.total - folder.answered
    eta = f"{left / rate:.0f} s" if rate > 0 and left > 0 else "-"
    return (f"{folder.label}: {folder.stamped}/{folder.total} stamped,"
            f" {folder.answered}/{folder.total} answered, {folder.listed} listed by C-FIND,"
            f" {rate:.0f} files/s, ETA {eta}")


class Progress:
    def __init__(self, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, *, quiet: bool = False,
                 expected: int = 0) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet  # count, never draw (watch: the status page shows it)
        self.enabled = quiet or self.stream.isatty()
        self.expected = expected  # files the batch was started for (watch knows it)
        self.started = clock()
        self.clock = clock
        self.folders: dict[str, _Folder] = {}
        self.current: _Folder | None = None  # the folder drawn: the last one that moved
        self.lock = threading.Lock()
        self.drawn_at = 0.0
        self.shown = False

    def __enter__(self) -> Progress:
        if self.enabled and not self.quiet:
            logs.console_around(self.clear, self.redraw)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and not self.quiet:
            self.clear()
            logs.console_around(None, None)

    def snapshot(self) -> dict[str, float | int | None]:
        """The batch so far: files answered of how many, files per second, ETA (seconds)."""
        with self.lock:
            answered = sum(f.answered for f in self.folders.values())
            listed = sum(f.total for f in self.folders.values())
        total = max(self.expected, listed)
        elapsed = max(self.clock() - self.started, 1e-6)
        rate = answered / elapsed
        left = max(0, total - answered)
        return {"files": total, "answered": answered, "left": left,
                "folders": len(self.folders), "rate": round(rate, 1),
                "eta_s": round(left / rate) if rate > 0 and left else None,
                "running_s": round(elapsed)}

    def folder(self, label: str, total: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.current = self.folders[label] = _Folder(label, total)
        self.redraw()

    def add(self, label: str, what: str, count: int = 1) -> None:
        """Count files of a folder stamped, answered or listed by C-FIND."""
        if not self.enabled or label not in self.folders:
            return
        with self.lock:
            self.current = self.folders[label]
            setattr(self.current, what, getattr(self.current, what) + count)
            now = self.clock()
            if now - self.drawn_at < 0.1:
                return
        self.redraw()

    def clear(self) -> None:
        if self.quiet:
            return
        with self.lock:
            if self.shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self.shown = False

    def redraw(self) -> None:
        if not self.enabled or self.quiet:
            return
        with self.lock:
            if self.current is None:
                return
            self.drawn_at = self.clock()
            self.stream.write("\r\033[K" + line(self.current, self.drawn_at)[:200])
            self.stream.flush()
            self.shown = True


_active: Progress | None = None


def activate(progress: Progress | None) -> None:
    """Count for this progress line (only when it draws: on a terminal)."""
    global _active
    _active = progress if progress is not None and progress.enabled else None


def current() -> dict[str, float | int | None] | None:
    """What the batch under way has done so far (None: no batch, or not counted)."""
    live = _active
    return live.snapshot() if live is not None else None


def active() -> bool:
    """Whether anything is counted: callers skip work done only for the line."""
    return _active is not None


def folder(name: str, total: int) -> None:
    if _active is not None:
        _active.folder(display(name), total)


def add(name: str, what: str, count: int = 1) -> None:
    """Count files of the folder named name (its directory name) stamped, answered or
    listed by C-FIND."""
    if _active is not None:
        _active.add(display(name), what, count)
