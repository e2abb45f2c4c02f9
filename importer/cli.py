"""Command line: `importer run-once` (a manual batch) and friends.

Exit codes (run-once): 0 every eligible file delivered and archived; 1 some left for
retry, held or quarantined; 2 usage or configuration error; 3 another process holds a
folder.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from importer import heap, logs
from importer.config import ConfigError, Settings, load_settings

EXIT_CONFIG = 2
REQUIRED_TOOLS = ("dcmftest", "dcmdump", "dcmodify", "dcmconv", "storescu")


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_file", metavar="FILE", type=click.Path(dir_okay=False),
                     help="TOML file (env IMPORTER_CONFIG); flags and env override it."),
        click.option("--import-dir", metavar="DIR", help="Folders to import (IMPORT_DIR)."),
        click.option("--archive-dir", metavar="DIR", help="Delivered files go here (ARCHIVE_DIR)."),
        click.option("--failed-dir", metavar="DIR", help="Quarantined files (FAILED_DIR)."),
        click.option("--log-dir", metavar="DIR", help="JSON log files (LOG_DIR)."),
        click.option("--state-dir", metavar="DIR", help="Journal and locks (STATE_DIR)."),
        click.option("--pacs", metavar="AET@HOST:PORT",
                     help="Primary PACS (PACS_AET, PACS_SERVER_IP, PACS_SERVER_PORT)."),
        click.option("--associations", type=int, metavar="N",
                     help="Parallel associations per destination (ASSOCIATIONS, default 4)."),
        click.option("-v", "--verbose", is_flag=True, help="Also print every DCMTK call."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _settings(flags: dict[str, Any], *, dry_run: bool = False) -> Settings:
    config_file = flags.pop("config_file", None)
    flags.pop("verbose", None)
    flags["dry_run"] = dry_run
    from importer.dcmtk import DcmtkMissing, tool_path

    missing = []
    for tool in REQUIRED_TOOLS:
        try:
            tool_path(tool)
        except DcmtkMissing:
            missing.append(tool)
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found — install dcmtk (apt-get install dcmtk)")
    return load_settings(flags, config_file=config_file)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Configuration mistakes end with one clear line and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from importer.dcmtk import DcmtkMissing

        try:
            return command(*args, **kwargs)
        except (ConfigError, DcmtkMissing) as exc:
            click.echo(f"importer: error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dicom-importer")
def main() -> None:
    """Import patient folders named '#<id>-<name>' into one or more PACS.

    Every file is stamped with its folder's PatientID and PatientName, verified, sent by
    DICOM C-STORE (DCMTK storescu) and archived only once every required PACS has
    answered success for it. Configuration comes from flags, then environment variables
    (the old scripts' names work), then an optional TOML file.
    """
    heap.bound()


@main.command("run-once")
@_common_options
@click.option("--dry-run", is_flag=True, help="Show what would happen; change nothing.")
@_user_errors
def run_once(dry_run: bool, verbose: bool, **flags: Any) -> None:
    """Process everything in the import dir once, then exit.

    \b
    Exit codes: 0 all delivered and archived; 1 some files left for retry, held or
    quarantined; 2 usage or configuration error; 3 a folder is busy in another importer.
    """
    settings = _settings(flags, dry_run=dry_run)
    logs.setup(None if dry_run else settings.log_dir, verbose=verbose)
    from importer.dcmtk import Stopped, request_stop
    from importer.pipeline import run_batch

    def stop(signum: int, _frame: object) -> None:
        logs.warn("%s received: stopping; unsent files stay for the next run",
                  signal.Signals(signum).name)
        request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from importer.progress import Progress, activate

    with logs.batch_log(None if dry_run else settings.log_dir), Progress() as live:
        activate(live)
        try:
            report = run_batch(settings, wait_for_settle=True)
        except Stopped:
            sys.exit(1)
        except OSError as exc:
            logs.error("Batch stopped: %s", exc)
            logging.getLogger("importer").debug("traceback", exc_info=True)
            sys.exit(1)
    sys.exit(report.exit_code)


@main.command()
@_common_options
@click.option("--delay", type=int, metavar="SECONDS",
              help="Quiet period per folder before it is processed (DELAY, default 180).")
@click.option("--rescan", "rescan_seconds", type=click.IntRange(5, 86400), default=300,
              show_default=True, metavar="SECONDS",
              help="Full rescan interval, a safety net for shares that miss events.")
@_user_errors
def watch(verbose: bool, rescan_seconds: int, **flags: Any) -> None:
    """Watch the import dir and process each folder once it has been quiet for DELAY s.

    Folders already there at start-up are considered at once. SIGTERM or Ctrl-C stops
    within seconds; nothing is lost, the next start picks up where this one left off.
    """
    settings = _settings(flags)
    logs.setup(settings.log_dir, verbose=verbose)
    from importer.watch import Watcher

    Watcher(settings, rescan_seconds=rescan_seconds).run()


@main.command()
@_common_options
@_user_errors
def check(verbose: bool, **flags: Any) -> None:
    """Check the configuration, DCMTK tools, directories and C-ECHO to every destination.

    Exits 1 naming what failed (e.g. a destination AET@host:port that does not answer).
    """
    settings = _settings(flags)
    logs.setup(None, verbose=verbose)
    from importer.status import run_checks

    checks = run_checks(settings)
    for item in checks:
        click.echo(f"{'ok  ' if item.ok else 'FAIL'}  {item.name}: {item.detail}")
    failed = [item.name for item in checks if not item.ok]
    if failed:
        click.echo(f"importer: check failed: {'; '.join(failed)}", err=True)
        sys.exit(1)


@main.command()
@_common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def status(verbose: bool, as_json: bool, **flags: Any) -> None:
    """Show pending folders and their quiet timers, unmatched entries, quarantined files
    and each destination's last success and failure."""
    settings = _settings(flags, dry_run=True)
    from importer.status import gather_status

    report = gather_status(settings)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    click.echo(f"Import dir {report['import_dir']}")
    click.echo(f"Pending folders: {len(report['pending'])}")
    for item in report["pending"]:
        click.echo(f"  {item['folder']}: {item['files']} files, quiet for {item['quiet_for_s']} s,"
                   f" due in {item['due_in_s']} s"
                   + (f", {item['left_in_place']} left in place" if item["left_in_place"] else ""))
    click.echo(f"Not matching the folder pattern (left untouched): {len(report['unmatched'])}")
    for name in report["unmatched"]:
        click.echo(f"  {name}")
    click.echo(f"Held (identity conflict or two patients; fix the folder, or importer"
               f" release FOLDER): {len(report['held'])}")
    for item in report["held"]:
        click.echo(f"  {item['folder']}: {item['reason']}")
    click.echo(f"Quarantined files: {len(report['quarantined'])}")
    for item in report["quarantined"]:
        click.echo(f"  {item['file']}: {item['reason']}")
    if report["missing_at_pacs"]:
        click.echo(f"Archived, missing at PACS (kept past retention; importer resend):"
                   f" {len(report['missing_at_pacs'])}")
        for item in report["missing_at_pacs"]:
            for name, d in item["destinations"].items():
                lost = len(d["missing"]) + len(d["under_another_patient_id"])
                if lost:
                    click.echo(f"  {item['folder']}: {lost} instances missing at {name}")
    click.echo("Destinations:")
    for item in report["destinations"]:
        click.echo(f"  {item['destination']} ({item['name']}"
                   f"{'' if item['required'] else ', optional'}): last success"
                   f" {item['last_success'] or 'never'}, last failure"
                   f" {item['last_failure'] or 'never'}"
                   + (f" ({item['last_error']})" if item["last_failure"] else "")
                   + (f"; FAILING since {item['failing_since']}: files wait for it"
                      if item["failing_since"] else ""))


@main.command()
@_common_options
@click.option("--yes", "confirmed", is_flag=True,
              help="Really delete; without it only lists what would go.")
@_user_errors
def prune(verbose: bool, confirmed: bool, **flags: Any) -> None:
    """Delete batch logs older than LOG_RETENTION_DAYS (30) and archive batches older than
    ARCHIVE_RETENTION_DAYS (90). A dry run unless --yes; `watch` prunes daily by itself."""
    settings = _settings(flags)
    logs.setup(settings.log_dir if confirmed else None, verbose=verbose)
    from importer.retention import prune as prune_expired

    results = prune_expired(settings, dry_run=not confirmed)
    unchecked = 0
    for result in results:
        item = result.item
        for folder, why in result.kept:
            click.echo(f"kept {folder} ({item.age_days:.0f} days old): {why}")
        unchecked += len(result.unchecked)
        if result.problem:
            click.echo(f"could not delete all of {item.kind} {item.path}: {result.problem}",
                       err=True)
        elif not result.kept:
            click.echo(f"{'deleted' if confirmed else 'would delete'} {item.kind}"
                       f" {item.path} ({item.age_days:.0f} days old)")
        else:
            gone = len(result.folders) - len(result.kept)
            click.echo(f"{'deleted' if confirmed else 'would delete'} {gone} of the folders"
                       f" in archive {item.path}")
    if unchecked:
        first = next(why for r in results for _f, why in r.unchecked)
        click.echo(f"{unchecked} archived folders could not be checked with a PACS, and"
                   f" {'went' if confirmed else 'would go'} all the same: {first}")
    if not results:
        click.echo("nothing older than the retention periods")
    elif not confirmed:
        click.echo("dry run: add --yes to delete")
    if any(r.problem for r in results):
        sys.exit(1)


@main.command()
@_common_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@_user_errors
def retry(verbose: bool, paths: tuple[str, ...], **flags: Any) -> None:
    """Put quarantined files (files, folders or batches under FAILED_DIR) back into the
    import dir, to be sent again."""
    settings = _settings(flags)
    logs.setup(settings.log_dir, verbose=verbose)
    from pathlib import Path

    from importer.archive import ArchiveError, restore_quarantined

    total = 0
    for path in paths:
        try:
            restored = restore_quarantined(Path(path), settings.failed_dir, settings.import_dir)
        except ArchiveError as exc:
            raise ConfigError(str(exc)) from None
        total += len(restored)
        for target in restored:
            logs.event("INFO", "Back for import: %s", target)
    click.echo(f"{total} files put back into {settings.import_dir}")


@main.command()
@_common_options
@click.option("--since", type=click.IntRange(0), metavar="DAYS",
              help="Only folders archived in the last DAYS days.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_user_errors
def audit(verbose: bool, since: int | None, as_json: bool, **flags: Any) -> None:
    """Ask each PACS whether it still holds every archived instance (one C-FIND per study),
    without deleting anything. Exit 1 if a PACS lacks any."""
    settings = _settings(flags)
    logs.setup(None, verbose=verbose)
    from importer.audit import audit_all

    found = audit_all(settings, since_days=since)
    if as_json:
        click.echo(json.dumps([a.as_dict() for a in found], ensure_ascii=False, indent=2))
    for result in [] if as_json else found:
        if not result.has_receipt:
            click.echo(f"{result.folder}: no receipt (not checked)")
        for name, d in result.destinations.items():
            state = (f"not checked: {d.unknown}" if d.unknown else
                     f"{d.listed} listed, {len(d.missing)} missing,"
                     f" {len(d.elsewhere)} under another PatientID")
            click.echo(f"{result.folder}: {d.label or name}: {state}")
    lacking = [a for a in found if not a.intact]
    if not as_json:
        click.echo(f"{len(found)} archived folders, {len(lacking)} with instances missing at a"
                   " PACS")
    sys.exit(1 if lacking else 0)


@main.command()
@_common_options
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@_user_errors
def resend(verbose: bool, folder: str, **flags: Any) -> None:
    """Send again what a PACS lost of an archived folder (ARCHIVE_DIR/<ts>/<folder>): the
    instances a PACS no longer lists go back through the pipeline (same identity, same
    checks, a new receipt), only to the PACS that lack them. Then the folder can be pruned."""
    settings = _settings(flags)
    logs.setup(settings.log_dir, verbose=verbose)
    from importer.resend import resend_missing

    with logs.batch_log(settings.log_dir):
        sys.exit(resend_missing(settings, folder))


@main.command()
@_common_options
@click.argument("folder")
@click.option("--reason", default="", metavar="TEXT",
              help="Why it is right to go on (kept in the journal and the receipt).")
@_user_errors
def release(verbose: bool, folder: str, reason: str, **flags: Any) -> None:
    """Let a held folder (FOLDER: its name in the import dir, or its path) go on at its
    next run as it is now: identity conflict or two patients accepted by a person.

    The release is recorded with when, who, why and what was accepted; it lapses when a
    file of the folder is added or changed. A folder renamed to the right ID needs none.
    """
    settings = _settings(flags)
    logs.setup(settings.log_dir, verbose=verbose)
    from importer.release import ReleaseError
    from importer.release import release as release_folder

    try:
        name, accepted = release_folder(settings, folder, reason)
    except ReleaseError as exc:
        raise ConfigError(str(exc)) from None
    click.echo(f"released {name}: it goes on at its next run (accepted: {accepted})")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@_user_errors
def receipt(path: str) -> None:
    """Show the receipt of an archived folder (PATH: the folder or its .receipt.json)."""
    from pathlib import Path

    from importer.receipt import receipt_path, render

    target = Path(path)
    if target.is_dir() and not receipt_path(target).exists():
        raise ConfigError(f"no receipt beside {target} (expected {receipt_path(target).name})")
    click.echo(render(target))
