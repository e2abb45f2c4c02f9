"""Console lines with the old scripts' tags; JSON lines in LOG_DIR.

`docker logs` must read like before (`[Watcher]`, `[Waiter]`, `[PHASE 1]`…`[PHASE 3]`,
`[INFO]`, `[WARN]`, `[ERROR]`) so existing greps keep working, while the files carry
structured records (one per DCMTK call) for whoever has to find out what happened.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

log = logging.getLogger("importer")

_LEVEL_TAGS = {logging.WARNING: "WARN", logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}


def event(tag: str, message: str, *args: Any, level: int = logging.INFO,
          exc_info: BaseException | None = None, **fields: Any) -> None:
    """Log one event under an old-style tag such as ``PHASE 1`` or ``Watcher``."""
    log.log(level, message, *args, exc_info=exc_info, extra={"tag": tag, **fields})


def warn(message: str, *args: Any, **fields: Any) -> None:
    event("WARN", message, *args, level=logging.WARNING, **fields)


def error(message: str, *args: Any, **fields: Any) -> None:
    event("ERROR", message, *args, level=logging.ERROR, **fields)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = _LEVEL_TAGS.get(record.levelno) or getattr(record, "tag", None) or "INFO"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} [{tag}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _json_formatter() -> JsonFormatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


def setup(log_dir: Path | None, *, verbose: bool = False) -> None:
    """Console on stderr; ``LOG_DIR/log.log`` for everything when log_dir is given."""
    root = logging.getLogger("importer")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter())
    root.addHandler(console)
    if log_dir is not None:
        all_runs = logging.FileHandler(log_dir / "log.log", encoding="utf-8",
                                       errors="backslashreplace")
        all_runs.setFormatter(_json_formatter())
        root.addHandler(all_runs)


@contextlib.contextmanager
def batch_log(log_dir: Path | None) -> Iterator[Path | None]:
    """One ``LOG_DIR/<yyyymmdd-HHMMSS>.log`` for the duration of one batch."""
    if log_dir is None:
        yield None
        return
    path = log_dir / (time.strftime("%Y%m%d-%H%M%S") + ".log")
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(_json_formatter())
    log.addHandler(handler)
    try:
        yield path
    finally:
        log.removeHandler(handler)
        handler.close()
