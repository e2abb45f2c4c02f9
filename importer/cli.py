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

from importer import logs
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
    with logs.batch_log(None if dry_run else settings.log_dir):
        try:
            report = run_batch(settings)
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
    click.echo(f"Held (may hold two patients; sort out by hand): {len(report['held'])}")
    for item in report["held"]:
        click.echo(f"  {item['folder']}: {item['reason']}")
    click.echo(f"Quarantined files: {len(report['quarantined'])}")
    for item in report["quarantined"]:
        click.echo(f"  {item['file']}: {item['reason']}")
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

    items = prune_expired(settings, dry_run=not confirmed)
    for item, problem in items:
        if problem:
            click.echo(f"could not delete all of {item.kind} {item.path}: {problem}", err=True)
        else:
            click.echo(f"{'deleted' if confirmed else 'would delete'} {item.kind}"
                       f" {item.path} ({item.age_days:.0f} days old)")
    if not items:
        click.echo("nothing older than the retention periods")
    elif not confirmed:
        click.echo("dry run: add --yes to delete")
    if any(problem for _item, problem in items):
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
