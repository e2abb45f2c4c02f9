"""Per-folder quiet periods (pure: the clock is injected, so tests need no sleeping).

A folder is due ``delay`` seconds after the last event *in that folder*, and never before
its retry backoff has passed. One folder still uploading never holds back another — the
old scripts' single global timer did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Timer:
    last_event: float
    not_before: float = 0.0


class QuietTimers:
    def __init__(self, delay: float, clock: Callable[[], float] = time.monotonic,
                 max_backoff: float = 3600.0) -> None:
        self.delay = delay
        self.clock = clock
        self.max_backoff = max_backoff
        self._timers: dict[str, _Timer] = {}
        self._failures: dict[str, int] = {}

    def touch(self, folder: str, at: float | None = None) -> bool:
        """Record activity in folder (at a given clock time); True if it was idle before."""
        at = self.clock() if at is None else at
        timer = self._timers.get(folder)
        if timer is None:
            self._timers[folder] = _Timer(at)
            return True
        timer.last_event = max(timer.last_event, at)
        return False

    def due(self, slack: float = 0.0) -> list[str]:
        """Folders whose quiet period (and backoff) is over; they stop being tracked. Once
        one is, those due within `slack` seconds more come along: a burst of small folders
        goes through as one batch."""
        now = self.clock()
        if not any(self._deadline(t) <= now for t in self._timers.values()):
            return []
        ready = sorted(name for name, t in self._timers.items()
                       if self._deadline(t) <= now + slack)
        for name in ready:
            del self._timers[name]
        return ready

    def seconds_until_next(self) -> float | None:
        """How long the caller may block before something is due (None: nothing pending)."""
        if not self._timers:
            return None
        return max(0.0, min(self._deadline(t) for t in self._timers.values()) - self.clock())

    def pending(self) -> dict[str, float]:
        """Folder -> seconds until it is due."""
        now = self.clock()
        return {name: max(0.0, self._deadline(t) - now) for name, t in self._timers.items()}

    def hurry(self, folder: str) -> None:
        """Due now, whatever its backoff: what it waited for (a destination) is back."""
        self._failures.pop(folder, None)
        self._timers[folder] = _Timer(self.clock() - self.delay)

    def succeeded(self, folder: str) -> None:
        self._failures.pop(folder, None)

    def failed(self, folder: str) -> float:
        """Schedule a retry with exponential backoff; return the wait in seconds."""
        count = self._failures.get(folder, 0) + 1
        self._failures[folder] = count
        wait = min(self.max_backoff, max(self.delay, 1.0) * 2 ** (count - 1))
        now = self.clock()
        timer = self._timers.setdefault(folder, _Timer(now - self.delay))
        timer.not_before = max(timer.not_before, now + wait)
        return wait

    def _deadline(self, timer: _Timer) -> float:
        return max(timer.last_event + self.delay, timer.not_before)
