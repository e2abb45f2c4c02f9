"""Where the importer's CPU goes, per DCMTK tool and in its own Python process.

    python bench/cpu_profile.py [--folders 6] [--files-per-folder 100] [--files N] [--rows 128]
                            [--frames N] [--repeat 3] [--workdir /tmp] [--py-spy out.txt]

Runs ``importer run-once`` on a generated corpus into storescp (TCP_NODELAY=1) with every
DCMTK tool behind a shim that execs ``/usr/bin/time`` to record each call's CPU and peak RSS.
The importer's Python CPU (its own process, and sh's work in each forked child before the
exec) is the whole tree's CPU less the tools'.
Medians over --repeat runs. With --py-spy, one more run is sampled by py-spy (all threads)
and its flat profile is written to the given file. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import IMPORTER, clean_env, compile_importer, count_files, generate  # noqa: E402
from simsite.dicomgen import _pixels, make_ct  # noqa: E402
from simsite.receivers import StoreSCP  # noqa: E402

TOOLS = ("dcmftest", "dcmdump", "dcmodify", "dcmconv", "storescu", "echoscu", "findscu")
SHIM = """#!/bin/sh
exec /usr/bin/time -q -f "%U %S %M" -o "{log}/{tool}.$$" "{real}" "$@"
"""


def make_shims(shim_dir: Path, log: Path) -> None:
    shim_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        if real is None:
            continue
        path = shim_dir / tool
        path.write_text(SHIM.format(real=real, tool=tool, log=log))
        path.chmod(0o755)


def read_shim_log(log: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per tool: its calls' CPU seconds (one record per call), and its peak RSS in KB."""
    per_tool: dict[str, list[float]] = defaultdict(list)
    peak: dict[str, int] = defaultdict(int)
    for record in log.iterdir():
        tool = record.name.partition(".")[0]
        user, system, rss_kb = record.read_text().split()[-3:]
        per_tool[tool].append(float(user) + float(system))
        peak[tool] = max(peak[tool], int(rss_kb))
    return per_tool, peak


def make_multiframe(corpus: Path, frames: int, rows: int) -> int:
    """One folder holding one image of `frames` frames of rows x rows, 16 bit."""
    def frames_of(ds: object) -> None:
        ds.NumberOfFrames = frames  # type: ignore[attr-defined]
        ds.PixelData = _pixels(rows) * frames  # type: ignore[attr-defined]

    make_ct(corpus / "#1001-Doe^John1" / "MULTIFRAME.dcm", rows=rows, extra=frames_of)
    return 1


def one_run(corpus: Path, tmp: Path, py_spy: Path | None = None) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    imp, archive = work / "import", work / "archive"
    subprocess.run(["cp", "-a", str(corpus), str(imp)], check=True)
    os.sync()  # the copy's writeback is not the contender's work
    archive.mkdir()
    log = work / "tools"
    log.mkdir()
    make_shims(work / "shims", log)
    dirs = {}
    for var in ("FAILED_DIR", "LOG_DIR", "STATE_DIR"):
        dirs[var] = str(work / var.split("_")[0].lower())
        os.makedirs(dirs[var])
    with StoreSCP(work / "rx", aet="STORESCP") as scp:
        env = clean_env(
            IMPORT_DIR=str(imp), ARCHIVE_DIR=str(archive), PACS_SERVER_IP=scp.host,
            PACS_SERVER_PORT=str(scp.port), PACS_AET=scp.aet, SETTLE_SECONDS="0", **dirs)
        env["PATH"] = f"{work / 'shims'}:{env['PATH']}"
        argv = [str(IMPORTER), "run-once"]
        if py_spy:
            argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--format",
                    "raw", "--gil", "--nonblocking", "-r", "1000", "-o", str(py_spy), "--", *argv]
        with open(work / "importer.out", "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        received = len(scp.received())
    archived = count_files(archive)
    if os.waitstatus_to_exitcode(status) != 0 or received != archived:
        sys.exit(f"run failed: exit {status}, received {received}, archived {archived}; "
                 f"see {work}")
    per_tool, peak = read_shim_log(log)
    total = usage.ru_utime + usage.ru_stime
    row = {"wall": wall, "total": total}
    for tool, cpus in per_tool.items():
        row[tool] = sum(cpus)
        row[f"{tool} calls"] = len(cpus)
        row[f"{tool} rss"] = peak[tool]
    # The importer's own process, and sh's work in each forked child before its exec.
    row["python"] = total - sum(sum(c) for c in per_tool.values())
    shutil.rmtree(work)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", type=int, default=6)
    p.add_argument("--files-per-folder", type=int, default=100)
    p.add_argument("--files", type=int)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--frames", type=int,
                   help="instead: one multi-frame file (2000 frames of 512 x 512: 1 GB)")
    p.add_argument("--py-spy", type=Path,
                   help="also sample one run's Python (GIL holders) into this file, in py-spy's"
                        " raw format (needs `.venv/bin/pip install py-spy`)")
    p.add_argument("--workdir", default="/tmp",
                   help="where the corpus and runs live (e.g. /dev/shm: no disk noise)")
    args = p.parse_args()
    if args.py_spy and not (Path(sys.executable).parent / "py-spy").exists():
        p.error("--py-spy needs py-spy in this environment: .venv/bin/pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="importer-profile-", dir=args.workdir))
    try:
        corpus = tmp / "corpus"
        n = make_multiframe(corpus, args.frames, args.rows) if args.frames \
            else generate(corpus, args)
        compile_importer()
        rows = [one_run(corpus, tmp) for _ in range(args.repeat)]
        keys = {k for r in rows for k in r if not k.endswith((" calls", " rss"))}
        keys -= {"wall", "total"}
        print(f"\n{n} files, importer run-once into storescp, medians of {args.repeat}\n")
        print(f"{'where':10} {'calls':>6} {'CPU s':>7} {'ms/file':>8} {'share':>6}"
              f" {'peak RSS MB':>12}")
        total = statistics.median(r["total"] for r in rows)
        for key in sorted(keys, key=lambda k: -statistics.median(r.get(k, 0) for r in rows)):
            cpu = statistics.median(r.get(key, 0.0) for r in rows)
            calls = statistics.median(r.get(f"{key} calls", 0) for r in rows) if key in TOOLS \
                else ""
            rss = max(r.get(f"{key} rss", 0) for r in rows) / 1024
            print(f"{key:10} {calls!s:>6} {cpu:7.3f} {cpu / n * 1000:8.3f} {cpu / total:6.0%}"
                  f" {format(rss, '12.1f') if rss else '(make bench)':>12}")
        print(f"{'total':10} {'':>6} {total:7.3f} {total / n * 1000:8.3f}"
              f"   (wall {statistics.median(r['wall'] for r in rows):.2f} s)")
        if args.py_spy:
            one_run(corpus, tmp, args.py_spy)
            print(f"py-spy samples: {args.py_spy}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
