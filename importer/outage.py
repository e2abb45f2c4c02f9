"""A destination that is down is a state of the destination, not of each folder (pure: the
clocks are injected, so an outage of days is tested in microseconds).

While a destination takes no association from us, `watch` parks the folders that wait only
for it (no per-folder backoff, no line per folder per retry), asks it by C-ECHO every
PROBE_INTERVAL, and, the moment it answers, makes all of them due at once, oldest first.
A destination that answers C-ECHO but still takes no files (it refuses our storage
association) has misled the probe: it is asked less and less often (doubling up to an
hour), and the folders wait for a send that succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

REMIND_EVERY = 3600.0
MAX_PROBE_INTERVAL = 3600.0


@dataclass
class Outage:
    reason: str  # what DCMTK said when it went down
    since: float  # wall clock: for people
    started: float  # monotonic
    next_probe: float  # monotonic
    last_reminder: float  # monotonic
    misled: int = 0  # probes that answered, followed by a send that failed again
    trying: bool = False  # a probe answered: the parked folders are being sent
    folders: dict[str, float] = field(default_factory=dict)  # parked folder -> parked at


class Outages:
    def __init__(self, probe_interval: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.probe_interval = probe_interval
        self.clock = clock
        self.wall = wall
        self.down: dict[str, Outage] = {}  # destination name -> its outage

    def failed(self, name: str, reason: str) -> bool:
        """A send to name got no association. True: it just went down (say so once); a
        failure after a probe that answered counts against the probe instead."""
        now = self.clock()
        outage = self.down.get(name)
        if outage is None:
            self.down[name] = Outage(reason, self.wall(), now, now + self.probe_interval, now)
            return True
        if outage.trying:
            outage.trying = False
            outage.misled += 1
        outage.reason = reason
        outage.next_probe = now + self._interval(outage)
        return False

    def lasted(self, outage: Outage) -> float:
        """How long outage has lasted, by the monotonic clock: a step of the wall clock
        while a PACS is down (NTP, a host's clock set by hand) does not make it longer,
        shorter or negative."""
        return self.clock() - outage.started

    def reached(self, name: str) -> Outage | None:
        """A send to name was answered: the outage it ends, if any."""
        return self.down.pop(name, None)

    def park(self, name: str, folders: list[str]) -> None:
        """These folders wait for name: due again only when it answers."""
        outage = self.down.get(name)
        if outage is not None:
            now = self.clock()
            for folder in folders:
                outage.folders.setdefault(folder, now)

    def parked(self) -> set[str]:
        return {folder for outage in self.down.values() for folder in outage.folders}

    def unavailable(self) -> dict[str, Outage]:
        """The destinations not to send to now: down, and not being tried after a probe
        answered."""
        return {name: o for name, o in self.down.items() if not o.trying}

    def waits_only_for_down(self, required: set[str]) -> bool:
        """Every required destination is unavailable: a folder cannot go anywhere now."""
        return bool(required) and required <= set(self.unavailable())

    def probes_due(self) -> list[str]:
        now = self.clock()
        return [name for name, o in self.down.items() if not o.trying and o.next_probe <= now]

    def probed(self, name: str, answered: bool) -> list[str]:
        """The probe's answer; returns the folders to send now (oldest first) when it
        answered, and releases them from the outage."""
        outage = self.down.get(name)
        if outage is None:
            return []
        now = self.clock()
        if not answered:
            outage.next_probe = now + self._interval(outage)
            return []
        outage.trying = True
        outage.next_probe = now + self._interval(outage)
        folders = sorted(outage.folders, key=outage.folders.__getitem__)
        outage.folders.clear()
        return folders

    def reminders_due(self) -> list[str]:
        """Destinations down for another REMIND_EVERY since they were last mentioned."""
        now = self.clock()
        due = [name for name, o in self.down.items() if now - o.last_reminder >= REMIND_EVERY]
        for name in due:
            self.down[name].last_reminder = now
        return due

    def seconds_until_next(self) -> float | None:
        """How long the watch loop may sleep before a probe or a reminder is due."""
        if not self.down:
            return None
        now = self.clock()
        return max(0.0, min(min(o.next_probe, o.last_reminder + REMIND_EVERY) - now
                            for o in self.down.values()))

    def _interval(self, outage: Outage) -> float:
        return min(MAX_PROBE_INTERVAL, self.probe_interval * 2 ** outage.misled)


def duration(seconds: float) -> str:
    """2 h 3 min, 4 min, 12 s: how long, as people say it."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours = seconds // 60 % 60, seconds // 3600
    if hours >= 24:
        return f"{hours // 24} d {hours % 24} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
