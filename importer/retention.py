"""Pruning by age, replacing the old host cron lines (logs 30 days, archives 90 days).

Only what this program wrote is ever removed: per-batch logs named
``<yyyymmdd-HHMMSS>.log`` and archive batches named ``<yyyymmdd_hhmmss>``; the age comes
from that name, so copying an archive elsewhere (new mtimes) does not keep it alive or
kill it early. Quarantined files are never pruned: a person has to look at them. An
archived folder is deleted only once each PACS has been asked whether it still holds it
(audit.py): the archive may be the last copy.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from importer.audit import ARCHIVE_BATCH, Auditor, archived_folders, forget, remember
from importer.config import Settings
from importer.logs import warn
from importer.receipt import receipt_path

_BATCH_LOG = re.compile(r"^(\d{8}-\d{6})\.log$")


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
        ("archive", settings.archive_dir, ARCHIVE_BATCH, "%Y%m%d_%H%M%S",
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


@dataclass
class Pruned:
    item: Expired
    problem: str | None = None  # what could not be deleted (e.g. root-owned old archives)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # folders kept, and why
    unchecked: list[tuple[Path, str]] = field(default_factory=list)  # deleted unasked: why
    folders: list[Path] = field(default_factory=list)  # the archived folders looked at


def prune(settings: Settings, *, dry_run: bool, now: datetime | None = None) -> list[Pruned]:
    """Remove what has expired (or only list it): logs by age; archived folders by age
    once each PACS still holds them (see audit.py; the dry run asks too). One unremovable
    file must not stop the rest."""
    results = [Pruned(item, folders=archived_folders(item.path) if item.kind == "archive"
                      else []) for item in expired(settings, now)]
    auditor = Auditor(settings)
    auditor.prefetch([folder for result in results for folder in result.folders])
    for result in results:
        item = result.item
        targets = [item.path]
        if item.kind == "archive":
            targets = []
            for folder in result.folders:
                audit = auditor.audit(folder)
                allowed, why = audit.may_delete(settings.prune_verify)
                if not allowed:
                    warn("Kept %s past retention: %s", folder, why)
                    result.kept.append((folder, why))
                    if not dry_run:
                        remember(settings, audit)
                    continue
                if why != "every instance still listed":
                    result.unchecked.append((folder, why))
                targets += [folder, receipt_path(folder)]
            if not result.kept:
                targets = [item.path]  # the whole batch, with anything else in it
        problems = [] if dry_run else [p for t in targets for p in _remove(t)]
        if not dry_run and item.kind == "archive":
            for target in targets:
                forget(settings, target)
        result.problem = ("; ".join(problems[:3]) + (" …" if len(problems) > 3 else "")
                          if problems else None)
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


def seconds_until_daily(last: float | None, now: float | None = None,
                        period: float = 86400.0) -> float:
    """For `watch`: prune at start, then once a day (or once a period)."""
    now = time.monotonic() if now is None else now
    return 0.0 if last is None else max(0.0, last + period - now)
