"""The outage case of ``make bench`` (issue 22): a corpus arrives while the PACS is down,
the PACS comes back; how long from its first answer to the last file archived, against the
raw-tools floor sending the same corpus to the same kind of receiver.

    python bench/outage.py [--folders 100] [--files-per-folder 6] [--probe-interval 5]

`importer watch` runs with DELAY 1 s and the given PROBE_INTERVAL; the receiver is storescp
with TCP_NODELAY=1. "back to archived" includes the wait for the next probe (on average half
of PROBE_INTERVAL): the README reports both it and the drain after the probe answered.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import (  # noqa: E402  (bench/bench.py: this script's directory is on sys.path)
    IMPORTER,
    Target,
    clean_env,
    compile_importer,
    count_files,
    read_hwm_kb,
    run_floor,
)
from simsite.dicomgen import make_corpus  # noqa: E402
from simsite.receivers import StoreSCP, free_port  # noqa: E402


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"outage bench: {what} did not happen within {timeout} s")
        time.sleep(0.02)


class LogTail:
    """The importer's log read from where the last look stopped: at 50,000 files the log
    grows to tens of MB, and rereading it every 20 ms would take a core from the importer."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset, self.tail = log, 0, ""

    def has(self, text: str) -> bool:
        if not self.log.exists():
            return False
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            raw = f.read()
        self.offset += len(raw)
        unread = self.tail + raw.decode("utf-8", errors="replace")
        at = unread.find(text)
        # Found: what followed it stays unread, for the next line waited for; not found:
        # only enough to match a line split between two reads.
        self.tail = unread[at + len(text):] if at >= 0 else unread[-len(text):]
        return at >= 0


def backlog_left(imp: Path) -> bool:
    """Whether files wait in the import dir: a folder is removed once it is archived, so the
    top level is looked at first (walking 50,000 files every 50 ms would load the CPU)."""
    if any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(imp)):
        return True
    return count_files(imp) > 0


def drain_after_outage(corpus: Path, work: Path, n: int, probe_interval: int) -> dict[str, float]:
    imp, archive = work / "import", work / "archive"
    imp.mkdir(parents=True)
    archive.mkdir()
    dirs = {var: str(work / var.split("_")[0].lower()) for var in ("FAILED_DIR", "LOG_DIR",
                                                                   "STATE_DIR")}
    port = free_port()
    env = clean_env(IMPORT_DIR=str(imp), ARCHIVE_DIR=str(archive), PACS_SERVER_IP="127.0.0.1",
                    PACS_SERVER_PORT=str(port), PACS_AET="STORESCP", DELAY="1",
                    PROBE_INTERVAL=str(probe_interval), SETTLE_SECONDS="0", **dirs)
    log = LogTail(Path(dirs["LOG_DIR"]) / "log.log")
    watch = subprocess.Popen([str(IMPORTER), "watch"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    try:
        wait_for(lambda: log.has("Watching"), 20, "watch start")
        subprocess.run(["cp", "-a", *[str(p) for p in corpus.iterdir()], str(imp)], check=True)
        wait_for(lambda: log.has("is down"), 120 + n / 500, "the outage noticed")
        time.sleep(probe_interval + 2)  # at least one probe that gets no answer
        with StoreSCP(work / "received", port=port) as pacs:
            up = time.monotonic()
            wait_for(lambda: log.has("answers again"), probe_interval + 30 + n / 500, "the probe")
            answered = time.monotonic()
            while backlog_left(imp):
                peak = max(peak, read_hwm_kb(watch.pid, b"watch") or 0)
                if time.monotonic() - up > 600:
                    raise SystemExit("outage bench: the backlog did not drain in 600 s")
                time.sleep(0.05)
            done = time.monotonic()
            received = len(pacs.received())
            peak = max(peak, read_hwm_kb(watch.pid, b"watch") or 0)  # VmHWM: the peak so far
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(30)
    if received != n or count_files(archive) != n:
        raise SystemExit(f"outage bench: received {received}, archived {count_files(archive)}"
                         f" of {n}")
    return {"back_to_archived_s": round(done - up, 3), "drain_s": round(done - answered, 3),
            "probe_wait_s": round(answered - up, 3), "watch_rss_mb": round(peak / 1024, 1)}


def floor_time(corpus: Path, work: Path) -> float:
    imp, archive = work / "floor-import", work / "floor-archive"
    subprocess.run(["cp", "-a", str(corpus), str(imp)], check=True)
    archive.mkdir()
    with StoreSCP(work / "floor-received") as pacs:
        run = run_floor(imp, archive, Target(pacs.host, pacs.port, pacs.aet,
                                             lambda: len(pacs.received())), work)
    if not run.ok:
        raise SystemExit(f"outage bench: floor failed: {run.note}")
    return run.seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", type=int, default=100)
    p.add_argument("--files-per-folder", type=int, default=6)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--probe-interval", type=int, default=5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    compile_importer()
    tmp = Path(tempfile.mkdtemp(prefix="importer-outage-", dir=args.workdir))
    try:
        corpus = tmp / "corpus"
        make_corpus(corpus, args.folders, args.files_per_folder, args.rows)
        n = args.folders * args.files_per_folder
        print(f"outage: {n} files in {args.folders} folders arrive while storescp is down;"
              f" watch DELAY 1 s, PROBE_INTERVAL {args.probe_interval} s", flush=True)
        runs = []
        for rep in range(1, args.repeat + 1):
            work = Path(tempfile.mkdtemp(prefix=f"run{rep}-", dir=tmp))
            result = drain_after_outage(corpus, work, n, args.probe_interval)
            result["floor_s"] = floor_time(corpus, work)
            result["drain_over_floor"] = round(result["drain_s"] / result["floor_s"], 2)
            runs.append(result)
            print(f"  #{rep}: PACS up -> last file archived {result['back_to_archived_s']:.2f} s"
                  f" (probe {result['probe_wait_s']:.2f} s + drain {result['drain_s']:.2f} s);"
                  f" floor {result['floor_s']:.2f} s; drain/floor"
                  f" {result['drain_over_floor']:.2f}x; watch RSS {result['watch_rss_mb']} MB",
                  flush=True)
            shutil.rmtree(work, ignore_errors=True)
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        print(f"median: PACS up -> archived {med['back_to_archived_s']:.2f} s, drain"
              f" {med['drain_s']:.2f} s, floor {med['floor_s']:.2f} s"
              f" ({med['drain_over_floor']:.2f}x)")
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "median": med}, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.pop("TCP_NODELAY", None)
    sys.exit(main())
