"""Counters for `/metrics`, in the Prometheus text format, written by hand.

Hand-written rather than prometheus_client: a few counters kept by this process plus gauges
read from the same state `importer status --json` reads, at scrape time; one dependency
less in an image that runs on NAS boxes, and nothing to keep in step with two registries.
Counters start at zero when the process starts, as Prometheus expects (it sees resets).
"""

from __future__ import annotations

import threading
from collections import defaultdict

_lock = threading.Lock()
_counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

HELP = {
    "dicom_importer_files_total": ("counter", "Files answered by a destination, by outcome"),
    "dicom_importer_bytes_total": ("counter", "Bytes of files answered by a destination"),
    "dicom_importer_quarantined_total": ("counter", "Files moved to FAILED_DIR"),
    "dicom_importer_archived_total": ("counter", "Files moved to ARCHIVE_DIR"),
    "dicom_importer_verify_total": ("counter", "Verification verdicts per destination"),
    "dicom_importer_dcmtk_seconds_sum": ("counter", "Seconds spent in DCMTK tools"),
    "dicom_importer_dcmtk_calls_total": ("counter", "DCMTK tool runs"),
}


def inc(name: str, value: float = 1.0, **labels: str) -> None:
    key = (name, tuple(sorted(labels.items())))
    with _lock:
        _counters[key] += value


def tool_ran(tool: str, seconds: float) -> None:
    inc("dicom_importer_dcmtk_seconds_sum", seconds, tool=tool)
    inc("dicom_importer_dcmtk_calls_total", tool=tool)


def render(gauges: list[tuple[str, str, dict[str, str], float]]) -> str:
    """The exposition text: this process's counters, then the given gauges
    (name, help, labels, value)."""
    lines: list[str] = []
    with _lock:
        counters = sorted(_counters.items())
    seen: set[str] = set()
    for (name, labels), value in counters:
        if name not in seen:
            kind, text = HELP.get(name, ("counter", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            seen.add(name)
        lines.append(f"{name}{_labels(dict(labels))} {_number(value)}")
    for name, text, labels, value in gauges:
        if name not in seen:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            seen.add(name)
        lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
