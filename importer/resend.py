"""`importer resend`: put back through the pipeline what a PACS lost of an archived folder.

Only the instances some required PACS no longer lists are copied back into the import dir
under the folder's name (so the same identity applies, and the same checks); the journal
is told which destinations still hold each of them, so nothing goes to a PACS that has it.
They are archived again in a new batch, with a new receipt beside the old one.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from importer.archive import free_name
from importer.audit import Auditor, FolderAudit, remember
from importer.config import ConfigError, Settings
from importer.folders import display, parse_folder_name
from importer.journal import FileKey, Journal
from importer.logs import event, warn
from importer.share import identity
from importer.snapshot import folder_lock


def resend_missing(settings: Settings, folder: str) -> int:
    """Returns the exit code: 0 nothing lost or all delivered again, 1 otherwise, 3 when
    another importer is processing the folder of that name in the import dir.

    The copies go into IMPORT_DIR/<folder>, where a watch loop's batch may be at work on
    the same folder: its lock is held from the audit to the end of the batch that sends
    them (run_batch takes it again, in this thread)."""
    archived = Path(folder).resolve()
    if archived.parent.parent != settings.archive_dir.resolve():
        raise ConfigError(f"{folder} is not an archived folder (ARCHIVE_DIR/<ts>/<folder>)")
    name = archived.name
    if parse_folder_name(name, settings.folder_pattern) is None:
        raise ConfigError(f"{display(name)} does not name a patient (FOLDER_PATTERN)")
    with folder_lock(settings, name) as mine:
        if not mine:
            warn("%s is being processed by another importer; nothing resent (try again)",
                 display(name))
            return 3
        return _resend(settings, archived, name)


def _resend(settings: Settings, archived: Path, name: str) -> int:
    audit = Auditor(settings).audit(archived)
    if not audit.has_receipt:
        raise ConfigError(f"no receipt beside {archived}: what the PACS should hold is unknown")
    down = [f"{d.label}: {d.unknown}" for d in audit.destinations.values() if d.down]
    if down:
        warn("Cannot ask %s; nothing resent", "; ".join(down))
        return 1
    lost = {rel for d in audit.destinations.values() for rel in d.missing}
    for d in audit.destinations.values():
        if d.elsewhere:
            warn("%s lists %d instances of %s under another PatientID: sort that out in the"
                 " PACS (resending under the same UID would not change it)", d.label,
                 len(d.elsewhere), display(name))
    if not lost:
        event("INFO", "%s: every instance is still listed; nothing to resend", display(name))
        remember(settings, audit)
        return 0 if audit.intact else 1

    target_root = settings.import_dir / name
    created = not target_root.exists()
    copies: dict[str, Path] = {}
    for rel in sorted(lost):
        target = free_name(target_root / rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archived / rel, target)
        copies[rel] = target
    _tell_journal(settings, audit, copies)
    event("INFO", "%s: %d instances a PACS no longer lists put back for sending",
          display(name), len(copies))

    from importer.pipeline import run_batch

    # We wrote these files and closed them: no need to wait for them to settle (a lease
    # still tells whether anyone else holds a file in the folder open for writing).
    batch_settings = replace(settings, settle_seconds=0) if created else settings
    report = run_batch(batch_settings, only={name})
    after = Auditor(settings).audit(archived)
    remember(settings, after)
    return report.exit_code


def _tell_journal(settings: Settings, audit: FolderAudit, copies: dict[str, Path]) -> None:
    """The destinations that still list an instance have it: record that for its copy."""
    journal = Journal(settings.state_dir)
    try:
        for dest_name, answer in audit.destinations.items():
            held = []
            for rel, copy in copies.items():
                if rel in answer.missing or rel in answer.elsewhere or answer.unknown:
                    continue
                ident = identity(str(copy))
                if ident is not None:
                    held.append(FileKey.of(str(copy), ident))
            journal.record(dest_name, [(k, True, 0, "still held (C-FIND before resend)")
                                       for k in held])
            journal.mark_verified(dest_name, held)
    finally:
        journal.close()
