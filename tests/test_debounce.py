"""Per-folder quiet periods with an injected clock: no sleeping, exact deadlines."""

from __future__ import annotations

import pytest

from importer.debounce import QuietTimers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_folder_is_due_delay_after_its_last_event() -> None:
    clock = Clock()
    timers = QuietTimers(180, clock)
    assert timers.touch("#1-A") is True
    clock.now += 100
    assert timers.touch("#1-A") is False  # a reset, not a new timer
    clock.now += 179
    assert timers.due() == []
    assert timers.seconds_until_next() == 1
    clock.now += 1
    assert timers.due() == ["#1-A"]
    assert timers.due() == [] and timers.seconds_until_next() is None


def test_an_uploading_folder_never_holds_back_another() -> None:
    clock = Clock()
    timers = QuietTimers(10, clock)
    timers.touch("#1-Slow")
    clock.now += 5
    timers.touch("#2-Quick")  # due at 1015
    while clock.now < 1015:  # #1 keeps receiving a file every 3 s
        clock.now += 3
        timers.touch("#1-Slow")
    assert timers.due() == ["#2-Quick"]
    assert timers.pending() == {"#1-Slow": 10}


def test_old_events_make_a_folder_due_at_once() -> None:
    clock = Clock()
    timers = QuietTimers(180, clock)
    timers.touch("#1-Old", at=clock.now - 3600)  # newest file an hour old at start-up
    assert timers.due() == ["#1-Old"]


def test_failures_back_off_exponentially_and_events_do_not_shorten_it() -> None:
    clock = Clock()
    timers = QuietTimers(10, clock, max_backoff=60)
    assert timers.failed("#1-A") == 10
    clock.now += 9
    timers.touch("#1-A", at=clock.now - 100)  # an old event must not bring it forward
    assert timers.due() == []
    clock.now += 1
    assert timers.due() == ["#1-A"]
    assert timers.failed("#1-A") == 20
    assert timers.failed("#1-A") == 40
    assert timers.failed("#1-A") == 60  # capped
    timers.succeeded("#1-A")
    timers.due()
    assert timers.failed("#1-A") == 10  # success resets the backoff


def test_folders_due_within_the_slack_come_along() -> None:
    clock = Clock()
    timers = QuietTimers(10, clock=clock)
    timers.touch("a")
    clock.now += 0.5
    timers.touch("b")
    clock.now += 5
    timers.touch("c")
    clock.now += 4.4
    assert timers.due(slack=1.0) == []  # nothing due yet: the slack never starts a batch
    clock.now += 0.1
    assert timers.due(slack=1.0) == ["a", "b"]  # b was 0.5 s from due; c is 5.5 s away
    assert timers.pending() == {"c": pytest.approx(5.5)}
