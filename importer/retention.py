"""Pruning by age, replacing the old host cron lines (logs 30 days, archives 90 days).

Only what this program wrote is ever removed: per-batch logs named
``<yyyymmdd-HHMMSS>.log`` and archive batches named ``<yyyymmdd_hhmmss>``; the age comes
from that name, so copying an archive elsewhere (new mtimes) does not keep it alive or
kill it early. Quarantined files are never pruned: a person has to look at them.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from importer.config import Settings

_BATCH_LOG = re.compile(r"^(\d{8}-\d{6})\.log$")
_ARCHIVE_BATCH = re.compile(r"^(\d{8}_\d{6})$")


@dataclass(frozen=True)
class Expired:
    path: Path
    kind: str  # "log" or "archive"
    age_days: float


def expired(settings: Settings, now: datetime | None = None) -> list[Expired]:
    """Logs and archive batches older than their retention (0 days = keep forever)."""
    now = now or datetime.now()
    found: list[Expired] = []
    for kind, root, pattern, fmt, days in (
        ("log", settings.log_dir, _BATCH_LOG, "%Y%m%d-%H%M%S", settings.log_retention_days),
        ("archive", settings.archive_dir, _ARCHIVE_BATCH, "%Y%m%d_%H%M%S",
         settings.archive_retention_days),
    ):
        if days <= 0 or not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            match = pattern.match(entry.name)
            if not match or entry.is_symlink():
                continue
            try:
                age = now - datetime.strptime(match.group(1), fmt)
            except ValueError:
                continue
            if age > timedelta(days=days):
                found.append(Expired(entry, kind, age.total_seconds() / 86400))
    return found


def prune(settings: Settings, *, dry_run: bool,
          now: datetime | None = None) -> list[tuple[Expired, str | None]]:
    """Remove what has expired (or only list it). Returns each item with the error that
    kept (part of) it, if any: one unremovable file (say, root-owned archives of the old
    scripts) must not stop the rest."""
    results: list[tuple[Expired, str | None]] = []
    for item in expired(settings, now):
        problems = [] if dry_run else _remove(item.path)
        results.append((item, "; ".join(problems[:3]) + (" …" if len(problems) > 3 else "")
                        if problems else None))
    return results


def _remove(path: Path) -> list[str]:
    """Delete a file or tree, going on past what cannot be deleted; return the errors."""
    problems: list[str] = []

    def note(_function: object, failed: str, exc_info: tuple) -> None:
        problems.append(f"{failed}: {getattr(exc_info[1], 'strerror', exc_info[1])}")

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=note)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        problems.append(f"{path}: {exc.strerror}")
    return problems


def seconds_until_daily(last: float | None, now: float | None = None) -> float:
    """For `watch`: prune at start, then once a day."""
    now = time.monotonic() if now is None else now
    return 0.0 if last is None else max(0.0, last + 86400 - now)
