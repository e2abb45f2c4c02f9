"""Console lines with the old scripts' tags; JSON lines in LOG_DIR.

`docker logs` must read like before (`[Watcher]`, `[Waiter]`, `[PHASE 1]`…`[PHASE 3]`,
`[INFO]`, `[WARN]`, `[ERROR]`) so existing greps keep working, while the files carry
structured records (one per DCMTK call) for whoever has to find out what happened.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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


# --- LOG_PATIENT_NAMES=false: names never reach the console or LOG_DIR --------------------

MASK = "***"
_hidden: Counter[str] = Counter()  # name (NFC and NFD forms) -> batches hiding it
_hidden_lock = threading.Lock()
_hidden_pattern: re.Pattern[str] | None = None
_hiding = 0  # > 0 while any batch runs with LOG_PATIENT_NAMES=false


@contextlib.contextmanager
def hidden_names(names: Iterable[str]) -> Iterator[None]:
    """While active, every log line (console and JSON, any field) shows these names as ***.

    Also tells :mod:`importer.dcmtk` to mask PatientName values (``(0010,0010)``) in the
    argv and output of its tool records, which may hold names no folder announced.
    """
    global _hiding
    forms = Counter({form for name in names if name
                     for form in (unicodedata.normalize("NFC", name),
                                  unicodedata.normalize("NFD", name), name)})
    with _hidden_lock:
        _hidden.update(forms)
        _hiding += 1
        _compile_hidden()
    try:
        yield
    finally:
        with _hidden_lock:
            _hidden.subtract(forms)
            _hiding -= 1
            _compile_hidden()


def _compile_hidden() -> None:
    global _hidden_pattern
    names = sorted((name for name, count in _hidden.items() if count > 0), key=len, reverse=True)
    _hidden_pattern = re.compile("|".join(map(re.escape, names))) if names else None


def hiding_names() -> bool:
    """True while a batch runs with LOG_PATIENT_NAMES=false."""
    return _hiding > 0


def redact(text: str) -> str:
    """text with every hidden name replaced by ***."""
    pattern = _hidden_pattern
    return pattern.sub(MASK, text) if pattern is not None else text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    return value


class _RedactingJsonFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        # log.log and the batch's log get the same line: encode a (large) record once.
        text = getattr(record, "_importer_json", None)
        if text is None:
            text = super().format(record)
            record._importer_json = text  # type: ignore[attr-defined]
        return text

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data = super().process_log_record(log_data)
        return _redact_value(log_data) if _hidden_pattern is not None else log_data


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = _LEVEL_TAGS.get(record.levelno) or getattr(record, "tag", None) or "INFO"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} [{tag}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


_around: tuple[Callable[[], None] | None, Callable[[], None] | None] = (None, None)


def console_around(before: Callable[[], None] | None,
                   after: Callable[[], None] | None) -> None:
    """Run before/after each console line (a live progress line clears and redraws)."""
    global _around
    _around = (before, after)


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def emit(self, record: logging.LogRecord) -> None:
        before, after = _around
        if before is not None and record.levelno >= self.level:
            before()
        super().emit(record)
        if after is not None and record.levelno >= self.level:
            after()


_JSON_FORMATTER: JsonFormatter | None = None


def _json_formatter() -> JsonFormatter:
    """One formatter for every JSON handler, so a record is encoded once (see format)."""
    global _JSON_FORMATTER
    if _JSON_FORMATTER is None:
        _JSON_FORMATTER = _make_json_formatter()
    return _JSON_FORMATTER


def _make_json_formatter() -> JsonFormatter:
    return _RedactingJsonFormatter(
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
    console = _ConsoleHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(ConsoleFormatter())
    root.addHandler(console)
    if log_dir is not None:
        _set_aside_legacy_log(log_dir / "log.log")
        all_runs = logging.FileHandler(log_dir / "log.log", encoding="utf-8",
                                       errors="backslashreplace")
        all_runs.setFormatter(_json_formatter())
        root.addHandler(all_runs)


def _set_aside_legacy_log(path: Path) -> None:
    """The old scripts wrote plain text to log.log; keep it, under another name, rather
    than append JSON lines to it (tools reading log.log expect one format)."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline().strip()
    except OSError:
        return
    if first and not first.startswith(b"{"):
        with contextlib.suppress(OSError):
            path.rename(path.with_name(f"log.log.scripts-{time.strftime('%Y%m%d-%H%M%S')}"))


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
