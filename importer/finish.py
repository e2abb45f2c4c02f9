"""[PHASE 3]: a folder's verdicts — archive what every required PACS has, quarantine what
cannot be sent, leave the rest — written ahead as a plan and carried out idempotently, so
the run after a crash finishes what this one began (see archive.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from importer import alerts, history, metrics
from importer.archive import Plan, PlanResult, carry_out, free_name, remove_empty_dirs
from importer.config import Settings
from importer.folders import display
from importer.intent import recover_interrupted_stamp
from importer.journal import Journal
from importer.logs import error, event, warn
from importer.model import Folder, SourceFile, folder_hash
from importer.receipt import build_receipt, receipt_entries, receipt_path
from importer.snapshot import WAITS_WHOLE, folder_lock, unchanged
from importer.sniff import OTHER, count_words
from importer.verdict import Fate, Target, decide
from importer.verify import Verifier


def recover(settings: Settings, folder_name: str, recovered: list[str]) -> None:
    """Finish what a crashed run left half done in this folder, before looking at it."""
    if restored := recover_interrupted_stamp(settings, folder_name):
        warn("%s: an interrupted run left %d files half-stamped; originals restored",
             display(folder_name), restored)
    plan_file = plan_path(settings, folder_name)
    if (plan := Plan.load(plan_file)) is not None:
        outcome = carry_out(plan)
        recovered += outcome.moved
        if outcome.failed or outcome.receipt_error:
            warn("%s: the archive step an earlier run began is still not complete: %s",
                 display(folder_name), "; ".join([*outcome.failed.values()][:1]
                                                 + [outcome.receipt_error or ""]).strip("; "))
        else:
            Plan.remove(plan_file)
            warn("%s: finished the archive step an earlier run began (%d files moved now)",
                 display(folder_name), len(outcome.moved))


def recover_elsewhere(settings: Settings, skip: set[str], recovered: list[str]) -> None:
    """Archive steps left unfinished for folders no longer in the import dir (all their
    files had moved; say, only the receipt was missing)."""
    for plan_file in sorted((settings.state_dir / "archiving").glob("*.json")):
        plan = Plan.load(plan_file)
        if plan is None or plan.folder in skip:
            continue
        with folder_lock(settings, plan.folder) as acquired:
            if acquired:
                recover(settings, plan.folder, recovered)


def plan_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "archiving" / f"{folder_hash(folder_name)}.json"


@history.counted  # the status page's hourly counts
def finish(folder: Folder, settings: Settings, journal: Journal, verifier: Verifier,
           batch_stamp: str, quiet: set[str] | None = None) -> None:
    """Archive what every required PACS has (and, where it answers C-FIND, lists under
    the folder's ID); quarantine what cannot be sent; leave the rest; report.

    quiet: labels of destinations known to be down (watch): files waiting only for them
    are not repeated per folder on the console (the outage is told once)."""
    if folder.held:
        event("INFO", "%s: held — %s", display(folder.name), folder.held)
        alerts.notify("held", folder.name, f"{display(folder.name)} held: {folder.held}")
        return
    deliveries = {d.name: journal.lookup([f.key for f in folder.ready], d.name)
                  for d in settings.destinations}
    targets = [(d, Target(d.label, d.required, verifier.applies(d)))
               for d in settings.destinations]
    to_archive: list[SourceFile] = []
    for source in folder.ready:
        if source.path in folder.to_quarantine:
            continue  # e.g. filed under another patient: never archived silently
        verdict = decide([(target, deliveries[d.name][source.key]) for d, target in targets],
                         settings.max_attempts)
        if verdict.fate is Fate.ARCHIVE:
            to_archive.append(source)
        elif verdict.fate is Fate.QUARANTINE:
            folder.to_quarantine[source.path] = verdict.reason
        else:
            folder.pending[source.path] = verdict.reason
    for d in settings.destinations:
        if not d.required:
            lacking = sum(not deliveries[d.name][f.key].delivered for f in folder.ready)
            if lacking:
                warn("%s: %d files did not reach optional destination %s",
                     display(folder.name), lacking, d.label)
    required = [d for d in settings.destinations if d.required]
    acknowledged = sum(all(deliveries[d.name][f.key].delivered for d in required)
                       for f in folder.ready)
    listed = sum(all(deliveries[d.name][f.key].verified_by == "c-find" for d in required)
                 for f in folder.ready) if required else 0
    ready_paths = {f.path for f in folder.ready}
    for source in folder.files:  # not stamped at all, e.g. the importer is stopping
        if not (source.path in ready_paths or source.path in folder.to_quarantine
                or source.path in folder.pending or source.path in folder.writing):
            folder.pending[source.path] = "not processed in this run"

    # Loose ends of a folder (not-DICOM files, a DICOMDIR) go once its images are done.
    if not folder.pending and not folder.writing:
        to_archive += folder.unsent
    # The last look before anything is moved: exactly what was read, stamped and sent, and
    # nobody writing it. Otherwise it stays; its next version is read and sent afresh.
    to_archive = unchanged(folder, to_archive, "after it was sent")
    by_path = {f.path: f for f in folder.files + folder.unsent}
    unchanged(folder, [by_path[p] for p in list(folder.to_quarantine) if p in by_path],
               "before its quarantine")
    target_root = settings.archive_dir / batch_stamp / folder.name
    failed_root = settings.failed_dir / batch_stamp / folder.name
    if to_archive:
        event("PHASE 3", "%s: archiving %d files to %s", display(folder.name), len(to_archive),
              display(str(target_root)))

    # Decide every target first and write the plan down; then carry it out (see archive.py).
    plan, taken = Plan(folder.name), set[str]()
    placed: list[tuple[SourceFile, str]] = []
    archive_root, quarantine_root = str(target_root), str(failed_root)
    for source in to_archive:
        target = free_name(f"{archive_root}/{source.rel}", taken)
        taken.add(target)
        plan.moves.append((source.path, target))
        placed.append((source, target))
    quarantine_rel = {}
    for path, reason in folder.to_quarantine.items():
        rel = by_path[path].rel if path in by_path else os.path.relpath(path, folder.path)
        target = free_name(f"{quarantine_root}/{rel}", taken)
        taken.add(target)
        plan.moves.append((path, target))
        plan.reasons[target] = f"{folder.name}/{rel}\n{reason}"
        quarantine_rel[path] = rel
    if placed:
        plan.receipt_path = str(receipt_path(target_root))
        plan.receipt = build_receipt(target_root, folder, settings, verifier)
        plan.entries = receipt_entries(target_root, folder, placed, deliveries, settings)
    outcome = PlanResult()
    if plan.moves:
        plan_file = plan_path(settings, folder.name)
        plan.save(plan_file)
        outcome = carry_out(plan)
        if not outcome.failed and not outcome.receipt_error:
            Plan.remove(plan_file)  # else the next run carries out the rest of it first

    archived = outcome.moved
    for path, why in outcome.failed.items():
        what = "quarantine" if path in folder.to_quarantine else "archive"
        folder.pending[path] = f"cannot {what}: {why}"
    for path in archived:
        if path in quarantine_rel:
            warn("%s/%s quarantined in %s: %s", display(folder.name),
                 display(quarantine_rel[path]), display(str(failed_root)),
                 folder.to_quarantine[path])
            folder.quarantined += 1
    if folder.quarantined:
        metrics.inc("dicom_importer_quarantined_total", folder.quarantined)
        first = next(p for p in archived if p in quarantine_rel)
        alerts.notify("quarantined", folder.name,
                      f"{folder.quarantined} files of {display(folder.name)} quarantined in"
                      f" {failed_root}: {folder.to_quarantine[first]}")
    metrics.inc("dicom_importer_archived_total", len(archived) - folder.quarantined)
    if outcome.receipt_error:
        error("%s: the receipt %s could not be written: %s", display(folder.name),
              display(plan.receipt_path or ""), outcome.receipt_error)
    journal.forget(archived)
    if not folder.writing:  # else a copy is still filling the folder: a directory emptied
        # by this archive step may be where its next file goes (chaos seed 24)
        remove_empty_dirs(folder.path)
    # One line per reason, not per file: a PACS that is down must not write 10,000 lines.
    by_reason: dict[str, list[str]] = {}
    for path, why in folder.pending.items():
        by_reason.setdefault(why, []).append(path)
        event("INFO", "%s: left for retry: %s", display(os.path.relpath(path, settings.import_dir)),
              why, level=logging.DEBUG)  # every file, in the JSON logs
    for why, paths in by_reason.items():
        if quiet and all(any(part.startswith(f"not yet at {label}:") for label in quiet)
                         for part in why.split("; ")):
            continue  # every file in the JSON log above; the console has the outage's story
        first = display(os.path.relpath(paths[0], settings.import_dir))
        if len(paths) == 1:
            warn("%s: left for retry: %s", first, why)
        else:
            warn("%s and %d more files: left for retry: %s", first, len(paths) - 1, why)
    unsent = {f.path for f in folder.unsent}
    folder.sent = sum(1 for p in archived if p not in quarantine_rel and p not in unsent)
    event("INFO", "%s: %d acknowledged, %d listed by C-FIND, %d sent and archived, %s,"
          " %d quarantined, %d left for retry, %d still being written, %d left in place, %.2f s",
          display(folder.name), acknowledged, listed, folder.sent,
          not_sent_words(folder, set(archived)), folder.quarantined, len(folder.pending),
          len(folder.writing), len(folder.left), time.monotonic() - folder.started)


def not_sent_words(folder: Folder, archived: set[str]) -> str:
    """What of the folder was never meant to be sent, and what became of it, in words:
    "1 DICOMDIR archived unsent, 12 viewer/program files archived unsent" (or "0 archived
    unsent"); those kept back while other files of the folder still wait say so."""
    done: list[tuple[str, str]] = []
    waiting: list[tuple[str, str]] = []
    for source in folder.unsent:
        kind = folder.unsent_kinds.get(source.path, OTHER)
        if source.path in archived:
            done.append(kind)
        elif source.path not in folder.writing and source.path not in folder.pending:
            waiting.append(kind)
    words = [f"{n} archived unsent" for n in count_words(done)] or ["0 archived unsent"]
    words += [f"{n} kept until the rest of the folder is done" for n in count_words(waiting)]
    return ", ".join(words)


def note_writing(folder: Folder, settings: Settings, noted: set[str] | None) -> None:
    """One [INFO] per folder for files still being written that were not reported yet
    (every file, every time, in the JSON log)."""
    fresh = []  # the files still arriving first, then those waiting for them
    waits = {p for p, why in folder.writing.items() if why.startswith(WAITS_WHOLE)}
    for path, why in sorted(folder.writing.items(), key=lambda i: (i[0] in waits, i[0])):
        event("INFO", "%s: left in place: %s", display(os.path.relpath(path, settings.import_dir)),
              why, level=logging.DEBUG)
        if noted is None or path not in noted:
            fresh.append((path, why))
    if noted is not None:
        noted.difference_update(p for p in list(noted)
                                if p.startswith(str(folder.path) + os.sep)
                                and p not in folder.writing)
        noted.update(folder.writing)
    if fresh:
        path, why = fresh[0]
        waiting = sum(p in waits for p, _ in fresh)
        arriving = len(fresh) - waiting
        others = (arriving or waiting) - 1  # the files named by the same line
        more = f" (and {others} more files)" if others else ""
        if waiting and arriving:
            why += f"; {waiting} settled files of the folder wait for the rest of it"
        event("INFO", "%s/%s%s: still being written or incomplete, left in place for the next"
              " quiet period: %s; judged only after %d s unchanged (INCOMPLETE_GRACE)",
              display(folder.name), display(os.path.relpath(path, folder.path)), more, why,
              settings.incomplete_grace)
