"""What an operator asks: is the setup sound (`check`), and what is waiting (`status`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from importer import dcmtk
from importer.audit import archive_batches, archived_folders, missing_at_pacs
from importer.config import Destination, Settings
from importer.folders import display
from importer.journal import Journal
from importer.receipt import receipt_path
from importer.release import read_note
from importer.snapshot import list_files, scan_import_dir
from importer.verify import find_fix

TOOLS = ("dcmftest", "dcmdump", "dcmodify", "dcmconv", "storescu", "echoscu", "findscu")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(settings: Settings) -> list[Check]:
    """Tools present, directories writable, every destination answers C-ECHO."""
    checks = []
    versions = dcmtk.versions()
    for tool in TOOLS:
        try:
            path = dcmtk.tool_path(tool)
        except dcmtk.DcmtkMissing as exc:
            checks.append(Check(f"tool {tool}", False, str(exc)))
            continue
        checks.append(Check(f"tool {tool}", True, f"{path} ({versions.get(tool, '?')})"))
    for label, path in (("IMPORT_DIR", settings.import_dir), ("ARCHIVE_DIR", settings.archive_dir),
                        ("FAILED_DIR", settings.failed_dir), ("LOG_DIR", settings.log_dir),
                        ("STATE_DIR", settings.state_dir)):
        ok = path.is_dir() and os.access(path, os.W_OK | os.X_OK)
        checks.append(Check(label, ok, f"{path} {'writable' if ok else 'missing or not writable'}"))
    for destination in settings.destinations:
        try:
            run = dcmtk.echo(destination)
        except dcmtk.DcmtkMissing:
            break
        problem = next((line[3:] for line in run.lines if line.startswith(("F: ", "E: "))),
                       f"echoscu exit code {run.exit_code}")
        role = "required" if destination.required else "optional"
        checks.append(Check(f"C-ECHO {destination.label} ({destination.name}, {role})",
                            run.exit_code == 0,
                            f"answered in {run.seconds:.2f} s" if run.exit_code == 0 else problem))
        if run.exit_code == 0 and destination.verify != "none":
            checks.append(_find_probe(destination))
    return checks


# A study UID no PACS holds: the probe asks for nothing, it only tests that C-FIND is answered.
_PROBE_STUDY = "1.2.826.0.1.3680043.8.498.1.0"


def _find_probe(destination: Destination) -> Check:
    """Which verification this destination will get: C-FIND, or its C-STORE answers only."""
    result = dcmtk.find_instances(destination, _PROBE_STUDY)
    name = f"C-FIND {destination.label} ({destination.name}, verify = {destination.verify})"
    if not result.error:
        return Check(name, True, "answered: files are verified by C-FIND before archiving")
    if result.refused:
        fix = find_fix(destination)
        if destination.verify == "auto":
            return Check(name, True, f"refused ({result.error}): C-STORE answers only; to"
                                     f" verify, {fix}")
        return Check(name, False, f"refused ({result.error}): files will wait; {fix}")
    return Check(name, False, f"failed: {result.error}")


def gather_status(settings: Settings) -> dict[str, Any]:
    """Pending folders (with when a watcher would take them), unmatched entries,
    quarantined files and each destination's last success and failure."""
    now = time.time()
    matched, unmatched = scan_import_dir(settings)
    pending = []
    for name, _patient in matched:
        files, left = list_files(settings.import_dir / name)
        if not files and not left:
            continue
        newest = max((f.mtime_ns / 1e9 for f in files), default=now)
        oldest = min((f.mtime_ns / 1e9 for f in files), default=now)
        pending.append({
            "folder": display(name), "files": len(files), "left_in_place": len(left),
            "bytes": sum(f.size for f in files), "quiet_for_s": round(now - newest),
            "due_in_s": max(0, round(newest + settings.delay - now)),
            "oldest_file_age_s": round(now - oldest),
        })
    held = []
    for path in sorted((settings.state_dir / "held").glob("*.txt")):
        if (note := read_note(path)) is None:
            continue  # released and gone meanwhile
        name, reason, released = note
        if (settings.import_dir / name).is_dir():
            held.append({"folder": display(name), "reason": reason, "released": released,
                         "release_with": f"importer release '{display(name)}' --reason …"})
    quarantined = []
    if settings.failed_dir.is_dir():
        for reason in sorted(settings.failed_dir.rglob("*.reason.txt")):
            text = reason.read_text(encoding="utf-8", errors="replace").splitlines()
            quarantined.append({
                "file": display(str(reason.with_name(reason.name[:-len(".reason.txt")]))),
                "reason": " ".join(text[1:]).strip() or "(no reason recorded)",
            })
    destinations = []
    known: dict[str, dict[str, Any]] = {}
    waiting: dict[str, int] = {}
    if (settings.state_dir / "journal.sqlite3").exists():
        journal = Journal(settings.state_dir)
        try:
            known = journal.destinations()
            waiting = journal.undelivered_counts()
        finally:
            journal.close()
    for destination in settings.destinations:
        entry = known.get(destination.name, {})
        destinations.append({
            "name": destination.name, "destination": destination.label,
            "required": destination.required,
            "last_success": _when(entry.get("last_success_at")),
            "last_failure": _when(entry.get("last_failure_at")),
            "last_error": entry.get("last_error"),
            "failing_since": _when(entry.get("failing_since")),
            "failing_since_ts": entry.get("failing_since"),
            "last_success_ts": entry.get("last_success_at"),
            "files_waiting": waiting.get(destination.name, 0),
        })
    return {"import_dir": str(settings.import_dir), "pending": pending,
            "unmatched": [display(n) for n in unmatched], "held": held,
            "quarantined": quarantined,
            "missing_at_pacs": missing_at_pacs(settings),
            "recent_archives": recent_archives(settings),
            "destinations": destinations}


def recent_archives(settings: Settings, count: int = 20) -> list[dict[str, Any]]:
    """The last archived folders, newest first, each with its receipt (relative to
    ARCHIVE_DIR) when it has one."""
    found: list[dict[str, Any]] = []
    for batch in reversed(archive_batches(settings)):
        for folder in reversed(archived_folders(batch)):
            receipt = receipt_path(folder)
            found.append({"folder": display(folder.name), "batch": batch.name,
                          "receipt": str(receipt.relative_to(settings.archive_dir))
                          if receipt.is_file() else None})
            if len(found) >= count:
                return found
    return found


def _when(timestamp: Any) -> str | None:
    if not isinstance(timestamp, int | float):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
