"""A file's fate, from what the journal knows of it at each destination (pure: no I/O).

Archive once every required destination has it (and, where its C-FIND verdict is needed,
listed it); quarantine once one of them has refused it, or lost it after acknowledging it,
`max_attempts` times; otherwise wait, saying for what. Every count that leads to a
quarantine grows by one per try against a PACS that answers, so against PACS that are up a
file waits at most `max_attempts` tries: only a destination that is down (no association,
so no answer for the file) keeps a file waiting longer, and the reason says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from importer.journal import Delivery


class Fate(Enum):
    ARCHIVE = "archive"
    QUARANTINE = "quarantine"
    WAIT = "wait"


@dataclass(frozen=True)
class Verdict:
    fate: Fate
    reason: str = ""


@dataclass(frozen=True)
class Target:
    """What the decision needs of a destination."""

    label: str
    required: bool
    needs_c_find: bool  # its C-FIND listing is required before archiving


def decide(states: Sequence[tuple[Target, Delivery]], max_attempts: int) -> Verdict:
    quarantine: list[str] = []
    wait: list[str] = []
    for target, state in states:
        if not target.required:
            continue
        if state.delivered:
            if target.needs_c_find and not state.verified:
                wait.append(f"not yet verified at {target.label}"
                            + (f": {state.verify_error}" if state.verify_error else ""))
            continue
        if state.refusals >= max_attempts:
            quarantine.append(f"refused by {target.label} {state.refusals} times:"
                              f" {state.last_error}")
        elif state.not_found >= max_attempts:
            quarantine.append(f"acknowledged by {target.label} but not found by C-FIND"
                              f" {state.not_found} times")
        else:
            wait.append(f"not yet at {target.label}: {state.last_error or 'not sent yet'}")
    if quarantine:
        return Verdict(Fate.QUARANTINE, "; ".join(quarantine))
    if wait:
        return Verdict(Fate.WAIT, "; ".join(wait))
    return Verdict(Fate.ARCHIVE)
