"""Does each PACS still hold what it acknowledged? Asked again before retention deletes an
archived folder (the site's last copy outside the PACS), and by `importer audit`.

The receipt beside an archived folder lists every instance sent and where; one C-FIND per
study and destination (IMAGE level, as the pipeline verifies) lists what the PACS holds
now. A folder may be deleted only when every required destination that answers C-FIND
still lists every instance it was sent under the folder's PatientID. A PACS that cannot be
asked (no C-FIND from us, `verify = none`) or an archive without a receipt (the old
scripts') follows PRUNE_VERIFY: `auto` deletes as before and says so, `required` keeps.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from importer import dcmtk
from importer.config import Destination, Settings
from importer.receipt import receipt_path


@dataclass
class AtDestination:
    """One destination's answer for one archived folder."""

    listed: int = 0
    missing: list[str] = field(default_factory=list)  # relative paths
    elsewhere: list[str] = field(default_factory=list)  # listed under another PatientID
    unknown: str | None = None  # why it could not be asked (down, refused, verify = none)
    down: bool = False
    label: str = ""  # AET@host:port


@dataclass
class FolderAudit:
    folder: Path  # ARCHIVE_DIR/<ts>/<folder>
    has_receipt: bool
    destinations: dict[str, AtDestination] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        """Every destination asked lists every instance under the folder's PatientID."""
        return all(not d.missing and not d.elsewhere for d in self.destinations.values())

    def may_delete(self, prune_verify: str) -> tuple[bool, str]:
        """Whether retention may delete this folder, and why (not)."""
        lacking = [f"{d.label} no longer lists {len(d.missing) + len(d.elsewhere)} of its"
                   f" {len(d.missing) + len(d.elsewhere) + d.listed} instances"
                   + (f" ({len(d.elsewhere)} under another PatientID)" if d.elsewhere else "")
                   for d in self.destinations.values() if d.missing or d.elsewhere]
        if lacking:
            return False, "; ".join(lacking) + " (importer resend puts them back)"
        down = [f"{d.label}: {d.unknown}" for d in self.destinations.values() if d.down]
        if down:
            return False, "could not ask " + "; ".join(down) + " (asked again next time)"
        unchecked = [f"{d.label} {d.unknown}" for d in self.destinations.values()
                     if d.unknown and not d.down]
        if not self.has_receipt:
            unchecked.insert(0, "no receipt (archived by the old scripts?)")
        if unchecked and prune_verify == "required":
            return False, "cannot check (PRUNE_VERIFY=required): " + "; ".join(unchecked)
        if unchecked:
            return True, "not checked (PRUNE_VERIFY=auto): " + "; ".join(unchecked)
        return True, "every instance still listed"

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "receipt": self.has_receipt,
                "destinations": {name: {"listed": d.listed, "missing": d.missing,
                                        "under_another_patient_id": d.elsewhere,
                                        "not_checked": d.unknown}
                                 for name, d in self.destinations.items()}}


# C-FIND queries in flight at once per audit: most of a query's time is findscu starting
# and the PACS answering, not this machine's CPU.
PARALLEL_QUERIES = 4


class Auditor:
    """Asks each destination once per study and remembers the answer for this run (one
    study is often archived in several batches)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.answers: dict[tuple[str, str], dcmtk.FindResult] = {}
        self.refused: dict[str, str] = {}  # destination -> why it answers no C-FIND

    def prefetch(self, folders: list[Path]) -> None:
        """Ask every (destination, study) these folders' receipts name, a few at a time."""
        wanted: set[tuple[str, str]] = set()
        by_name = {d.name: d for d in self.settings.destinations
                   if d.required and d.verify != "none"}
        for folder in folders:
            try:
                receipt = json.loads(receipt_path(folder).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            for f in receipt.get("files", []):
                for name in f.get("destinations", {}) if f.get("sent") else ():
                    if name in by_name and f.get("study_instance_uid"):
                        wanted.add((name, f["study_instance_uid"]))
        wanted -= set(self.answers)
        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=PARALLEL_QUERIES) as pool:
            found = pool.map(lambda key: dcmtk.find_instances(by_name[key[0]], key[1]),
                             sorted(wanted))
            self.answers.update(zip(sorted(wanted), found, strict=True))

    def audit(self, folder: Path) -> FolderAudit:
        path = receipt_path(folder)
        if not path.is_file():
            return FolderAudit(folder, has_receipt=False)
        receipt = json.loads(path.read_text(encoding="utf-8"))
        patient_id = receipt["patient"]["id"]
        result = FolderAudit(folder, has_receipt=True)
        for destination in self.settings.destinations:
            if not destination.required:
                continue
            sent = [f for f in receipt["files"] if f.get("sent")
                    and destination.name in f.get("destinations", {})]
            if sent:
                answer = self._ask(destination, patient_id, sent)
                answer.label = destination.label
                result.destinations[destination.name] = answer
        return result

    def _ask(self, destination: Destination, patient_id: str,
             files: list[dict[str, Any]]) -> AtDestination:
        answer = AtDestination()
        if destination.verify == "none":
            answer.unknown = "verify = none"
            return answer
        if destination.name in self.refused:
            answer.unknown = self.refused[destination.name]
            return answer
        for study in sorted({f["study_instance_uid"] for f in files}):
            found = self._find(destination, study)
            if found.refused:
                self.refused[destination.name] = f"answers no C-FIND ({found.error})"
                return AtDestination(unknown=self.refused[destination.name])
            if found.error:
                return AtDestination(unknown=found.error, down=True)
            for f in (f for f in files if f["study_instance_uid"] == study):
                where = found.instances.get(f["sop_instance_uid"])
                if where is None:
                    answer.missing.append(f["path"])
                elif where != patient_id:
                    answer.elsewhere.append(f["path"])
                else:
                    answer.listed += 1
        return answer

    def _find(self, destination: Destination, study: str) -> dcmtk.FindResult:
        key = (destination.name, study)
        if key not in self.answers:
            self.answers[key] = dcmtk.find_instances(destination, study)
        return self.answers[key]


# Archive batch directories are named by when they were written: <yyyymmdd_hhmmss>.
ARCHIVE_BATCH = re.compile(r"^(\d{8}_\d{6})$")


def archive_batches(settings: Settings, since_days: int | None = None,
                    now: datetime | None = None) -> list[Path]:
    """Archive batch directories (<yyyymmdd_hhmmss>), oldest first; with since_days only
    those of the last since_days days."""
    now = now or datetime.now()
    batches = []
    if settings.archive_dir.is_dir():
        for entry in sorted(settings.archive_dir.iterdir()):
            match = ARCHIVE_BATCH.match(entry.name)
            if not match or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                when = datetime.strptime(match.group(1), "%Y%m%d_%H%M%S")
            except ValueError:
                continue
            if since_days is None or now - when <= timedelta(days=since_days):
                batches.append(entry)
    return batches


def archived_folders(batch: Path) -> list[Path]:
    """The patient folders archived in one batch directory (<ts>/<folder>)."""
    return sorted(p for p in batch.iterdir() if p.is_dir() and not p.is_symlink())


def audit_all(settings: Settings, since_days: int | None = None) -> list[FolderAudit]:
    """The check for every archived folder (of the last since_days days), without deleting;
    `importer status` then lists those a PACS no longer fully holds."""
    folders = [f for batch in archive_batches(settings, since_days)
               for f in archived_folders(batch)]
    auditor = Auditor(settings)
    auditor.prefetch(folders)
    found = []
    for folder in folders:
        result = auditor.audit(folder)
        remember(settings, result)
        found.append(result)
    return found


# --- what `importer status` lists: archived folders a PACS no longer fully holds ---------


def missing_key(folder: Path | str) -> str:
    """The name of a folder's entry: what the status page's resend link carries (no
    patient name in a URL)."""
    return hashlib.sha256(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _note_path(settings: Settings, folder: Path) -> Path:
    return settings.state_dir / "missing-at-pacs" / f"{missing_key(folder)}.json"


def remember(settings: Settings, audit: FolderAudit) -> None:
    """Keep (or clear) the folder's entry in the 'archived, missing at PACS' list."""
    note = _note_path(settings, audit.folder)
    if audit.has_receipt and not audit.intact:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(json.dumps(audit.as_dict(), ensure_ascii=False), encoding="utf-8")
    elif audit.intact:
        note.unlink(missing_ok=True)


def forget(settings: Settings, folder: Path) -> None:
    _note_path(settings, folder).unlink(missing_ok=True)


def missing_entry(settings: Settings, key: str) -> dict[str, Any] | None:
    """The listed entry under key, if it is one and its archived folder is still there."""
    if len(key) != 20 or any(c not in "0123456789abcdef" for c in key):
        return None
    try:
        entry = json.loads((settings.state_dir / "missing-at-pacs" / f"{key}.json")
                           .read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = entry.get("folder") if isinstance(entry, dict) else None
    if not isinstance(folder, str) or missing_key(folder) != key or not Path(folder).is_dir():
        return None
    return entry


def missing_at_pacs(settings: Settings) -> list[dict[str, Any]]:
    found = []
    for note in sorted((settings.state_dir / "missing-at-pacs").glob("*.json")):
        entry = json.loads(note.read_text(encoding="utf-8"))
        if Path(entry["folder"]).is_dir():
            found.append(entry)
    return found
