"""Benchmark behind ``make bench``: the old scripts, the raw-tools floor and ``importer run-once``.

All three import identical copies of one generated corpus into the same kind of receiver, so
the only difference is the pipeline. Receivers: ``storescp`` with ``TCP_NODELAY=1`` (a tuned
PACS) and Orthanc as Debian ships it (Nagle on: one association stalls ~44 ms per file).

    python bench/bench.py [--folders 6] [--files-per-folder 100] [--files N] [--rows 128]
                          [--receiver storescp|orthanc|both] [--repeat 3] [--json out.json]

Not a test: it prints medians and ratios (targets in issue 3: >= 50x faster than legacy,
<= 1.5x the floor, RSS flat in the number of files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simsite.dicomgen import make_corpus, make_patient_folder  # noqa: E402
from simsite.receivers import Orthanc, StoreSCP  # noqa: E402

LEGACY = Path(os.environ.get("LEGACY_PIPELINE") or REPO.parent / "shared/bench/legacy-pipeline.sh")
IMPORTER = Path(sys.executable).parent / "importer"
METHODS = ("legacy", "floor", "importer")
RECEIVERS = {
    "storescp": "storescp, TCP_NODELAY=1 (tuned PACS)",
    "orthanc": "Orthanc as Debian ships it (Nagle on)",
}
FOLDER_RE = re.compile(r"^#([0-9]+)-([#^A-Za-z0-9]+)$")  # as in legacy-pipeline.sh
KEEP = False  # --keep: leave every run's directories for inspection
VERIFY = "auto"  # --verify: PACS_VERIFY for the importer
RECONCILE_OFF = "importer-reconcile-off"  # --reconcile-cost: the importer with RECONCILE=off
RSS_NOTE = (
    "importer RSS = peak VmHWM of the importer's Python process, sampled every 20 ms; "
    "tree RSS = ru_maxrss from wait4 (max over it and its DCMTK children)"
)


@dataclass
class Run:
    """One timed import: seconds, whether it counts, and what the receiver/archive ended with."""

    receiver: str
    method: str
    seconds: float
    ok: bool
    note: str
    rss_kb: int | None = None
    tree_rss_kb: int | None = None
    journal_kb: int | None = None  # the importer's SQLite journal (and its WAL) afterwards
    cpu_s: float | None = None  # user + system, the pipeline's processes and their children


@dataclass
class Target:
    """Where to send: the receiver's address and a way to count what it has stored."""

    host: str
    port: int
    aet: str
    count: Callable[[], int]


# ---------------------------------------------------------------- corpus and helpers


def generate(corpus: Path, args: argparse.Namespace) -> int:
    """Generate the corpus once; return its number of files.

    --files N: 10 folders; from 20,000 files on, one folder of 20,000 (a large study) and
    the rest in folders of 100 (a day of small ones)."""
    if args.files:
        if args.files >= 20_000:
            sizes = [20_000] + [100] * ((args.files - 20_000) // 100)
            if rest := (args.files - 20_000) % 100:
                sizes.append(rest)
        else:
            base, extra = divmod(args.files, 10)
            sizes = [base + (1 if k <= extra else 0) for k in range(1, 11)]
        for k, n in enumerate(sizes, start=1):
            make_patient_folder(
                corpus,
                f"#{1000 + k}-Doe^John{k}",
                n,
                rows=args.rows,
                patient_id=f"OLD{k}",
                patient_name=f"Old^Name{k}",
            )
        return int(args.files)
    make_corpus(corpus, args.folders, args.files_per_folder, args.rows)
    return int(args.folders * args.files_per_folder)


def count_files(root: Path) -> int:
    """Files under root, not counting the importer's receipts (<folder>.receipt.json)."""
    return sum(len([f for f in files if not f.endswith(".receipt.json")])
               for _, _, files in os.walk(root))


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that would change a pipeline's behaviour, plus extra."""
    drop = (
        "TCP_NODELAY",
        "PACS_",
        "BACKUP_PACS_",
        "IMPORT_DIR",
        "ARCHIVE_DIR",
        "FAILED_DIR",
        "LOG_DIR",
        "STATE_DIR",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def chunks(args: list[str], env: dict[str, str]) -> Iterator[list[str]]:
    """Split argv tails below the kernel's limit (half of ARG_MAX minus the environment)."""
    budget = os.sysconf("SC_ARG_MAX") // 2 - sum(len(k) + len(v) + 10 for k, v in env.items())
    chunk: list[str] = []
    size = 0
    for a in args:
        cost = len(a.encode()) + 1 + 8
        if chunk and size + cost > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(a)
        size += cost
    if chunk:
        yield chunk


def tail(path: Path, n: int = 20) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in lines[-n:])


# ---------------------------------------------------------------- the three pipelines


def run_legacy(imp: Path, archive: Path, t: Target, work: Path) -> Run:
    """The old scripts' work: one dcmodify per file, one storescu without TCP_NODELAY, mv."""
    log = work / "legacy.log"
    argv = ["bash", str(LEGACY), str(imp), str(archive), t.host, str(t.port), t.aet]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env()).returncode
        seconds = time.perf_counter() - t0
    return Run("", "legacy", round(seconds, 4), rc == 0, f"exit {rc}")


def run_floor(imp: Path, archive: Path, t: Target, work: Path) -> Run:
    """The raw tools, nothing in between: dcmodify -nb per folder, one storescu, one mv.

    Timed from the directory listing to the end of ``mv``; Python only spawns the tools.
    """
    env = clean_env()
    nodelay = clean_env(TCP_NODELAY="1")
    log = work / "floor.log"
    with open(log, "wb") as out:

        def tool(argv: list[str], tool_env: dict[str, str]) -> int:
            return subprocess.run(
                argv, cwd=imp, env=tool_env, stdout=out, stderr=subprocess.STDOUT
            ).returncode

        t0 = time.perf_counter()
        rcs = []
        folders = sorted(d.name for d in imp.iterdir() if d.is_dir())
        every: list[str] = []
        for name in folders:
            m = FOLDER_RE.match(name)
            assert m, name
            files = sorted(
                str(Path(dp, f).relative_to(imp)) for dp, _, fs in os.walk(imp / name) for f in fs
            )
            head = ["dcmodify", "-nb", "-i", f"(0010,0020)={m[1]}", "-i", f"(0010,0010)={m[2]}"]
            for chunk in chunks(files, env):
                rcs.append(tool(head + chunk, env))
            every += files
        for chunk in chunks(every, nodelay):
            rcs.append(tool(["storescu", "-aec", t.aet, t.host, str(t.port), *chunk], nodelay))
        dest = archive / time.strftime("%Y%m%d_%H%M%S")
        dest.mkdir(parents=True)
        rcs.append(tool(["mv", *folders, str(dest)], env))
        seconds = time.perf_counter() - t0
    bad = [rc for rc in rcs if rc != 0]
    return Run(
        "", "floor", round(seconds, 4), not bad, f"{len(rcs)} tool calls, non-zero exits {bad}"
    )


def read_hwm_kb(pid: int, command: bytes = b"run-once") -> int | None:
    """VmHWM of ``pid`` once it runs the importer's command (before exec it is a copy of
    us)."""
    try:
        if command not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def run_importer(imp: Path, archive: Path, t: Target, work: Path,
                 reconcile: str = "hold") -> Run:
    """``importer run-once`` from this venv with the old scripts' variables; exit 0 required."""
    if not IMPORTER.exists():
        return Run("", "importer", 0.0, False, f"{IMPORTER} not found (pip install -e .)")
    dirs = {}
    for var in ("FAILED_DIR", "LOG_DIR", "STATE_DIR"):
        dirs[var] = str(work / var.split("_")[0].lower())
        os.makedirs(dirs[var])
    env = clean_env(
        IMPORT_DIR=str(imp),
        ARCHIVE_DIR=str(archive),
        PACS_SERVER_IP=t.host,
        PACS_SERVER_PORT=str(t.port),
        PACS_AET=t.aet,
        PACS_VERIFY=VERIFY,
        RECONCILE=reconcile,
        SETTLE_SECONDS="0",  # the corpus was written a moment ago; leases are still checked
        **dirs,
    )
    log = work / "importer.out"
    peak = [0]
    done = threading.Event()
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(IMPORTER), "run-once"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], read_hwm_kb(proc.pid) or 0)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    note = f"exit {rc}"
    if rc != 0:
        note += "\n" + tail(log)
    journal = sum(p.stat().st_size for p in Path(dirs["STATE_DIR"]).glob("journal.sqlite3*"))
    return Run("", "importer", round(seconds, 4), rc == 0, note, peak[0] or None, usage.ru_maxrss,
               journal // 1024)


PIPELINES: dict[str, Callable[[Path, Path, Target, Path], Run]] = {
    "legacy": run_legacy,
    "floor": run_floor,
    "importer": run_importer,
    RECONCILE_OFF: lambda imp, archive, t, work: run_importer(imp, archive, t, work, "off"),
}


# ---------------------------------------------------------------- orchestration


def compile_importer() -> None:
    """Write the importer's bytecode, as `pip install` does in the Docker image: an editable
    checkout under PYTHONDONTWRITEBYTECODE=1 would compile its modules again on every start
    (about 40 ms of CPU a run), which no deployment pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "importer")],
                   check=True)


def children_cpu() -> float:
    """CPU seconds of every child process waited for so far (their children included);
    the receivers, still running, are not in it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(receiver: str, method: str, corpus: Path, n: int, tmp: Path, t: Target) -> Run:
    """Copy the corpus, run one pipeline into the receiver, check what arrived and what moved."""
    work = Path(tempfile.mkdtemp(prefix=f"{receiver}-{method}-", dir=tmp))
    imp, archive = work / "import", work / "archive"
    subprocess.run(["cp", "-a", str(corpus), str(imp)], check=True)
    os.sync()  # the copy's writeback is not the contender's work
    archive.mkdir()
    before = t.count()
    cpu_before = children_cpu()
    run = PIPELINES[method](imp, archive, t, work)
    run.cpu_s = round(children_cpu() - cpu_before, 3)
    run.receiver, run.method = receiver, method
    got, archived, left = t.count() - before, count_files(archive), count_files(imp)
    checks = f"receiver got {got}/{n}, archived {archived}/{n}, left in import {left}"
    if (got, archived, left) != (n, n, 0):
        run.ok = False
    run.note = f"{checks}; {run.note}"
    if not KEEP:
        shutil.rmtree(work)
    return run


def bench_receiver(
    receiver: str, methods: list[str], corpus: Path, n: int, tmp: Path, repeat: int
) -> list[Run]:
    runs = []
    orthanc = Orthanc(tmp / "orthanc", tcp_nodelay=False) if receiver == "orthanc" else None
    if orthanc:
        orthanc.start()
    try:
        for rep in range(1, repeat + 1):
            for method in methods:
                if orthanc:
                    orthanc.delete_all()  # an empty PACS per run, without a 3 s restart
                    t = Target(orthanc.host, orthanc.port, orthanc.aet, orthanc.count_instances)
                    run = one_run(receiver, method, corpus, n, tmp, t)
                else:
                    with StoreSCP(tmp / f"rx-{method}-{rep}", aet="STORESCP") as scp:
                        t = Target(scp.host, scp.port, scp.aet, lambda s=scp: len(s.received()))
                        run = one_run(receiver, method, corpus, n, tmp, t)
                    if not KEEP:
                        shutil.rmtree(scp.out_dir)
                status = "ok" if run.ok else "INVALID"
                rss = f", importer RSS {run.rss_kb / 1024:.1f} MB" if run.rss_kb else ""
                if run.journal_kb is not None:
                    rss += f", journal {run.journal_kb} KB"
                print(
                    f"  {receiver:8} {method:8} #{rep}: {run.seconds:7.2f} s{rss}  "
                    f"[{status}: {run.note}]",
                    flush=True,
                )
                runs.append(run)
    finally:
        if orthanc:
            orthanc.stop()
    return runs


def median(runs: list[Run], receiver: str, method: str, attr: str = "seconds") -> float | None:
    values = [
        getattr(r, attr)
        for r in runs
        if r.receiver == receiver and r.method == method and r.ok and getattr(r, attr)
    ]
    return statistics.median(values) if values else None


def summarize(runs: list[Run], receivers: list[str]) -> dict[str, dict[str, float | None]]:
    out = {}
    for rc in receivers:
        legacy, floor, imp = (median(runs, rc, m) for m in METHODS)
        rss, tree = (
            median(runs, rc, "importer", "rss_kb"),
            median(runs, rc, "importer", "tree_rss_kb"),
        )
        ratios = {
            "legacy_s": legacy,
            "floor_s": floor,
            "importer_s": imp,
            "legacy_over_importer": legacy / imp if legacy and imp else None,
            "importer_over_floor": imp / floor if imp and floor else None,
            "legacy_over_floor": legacy / floor if legacy and floor else None,
            "importer_rss_mb": rss / 1024 if rss else None,
            "tree_rss_mb": tree / 1024 if tree else None,
            "floor_cpu_s": median(runs, rc, "floor", "cpu_s"),
            "importer_cpu_s": median(runs, rc, "importer", "cpu_s"),
        }
        cpu_floor, cpu_imp = ratios["floor_cpu_s"], ratios["importer_cpu_s"]
        ratios["importer_cpu_over_floor"] = cpu_imp / cpu_floor if cpu_imp and cpu_floor else None
        out[rc] = {k: None if v is None else round(v, 3) for k, v in ratios.items()}
    return out


def print_table(summary: dict[str, dict[str, float | None]], runs: list[Run], n: int) -> None:
    print_times(summary, runs, n)
    print(f"\nCPU (user + system, children included), medians, {n} files\n")
    print(f"{'receiver':9} {'floor CPU s':>12} {'importer CPU s':>15} {'importer/floor':>15}"
          f" {'floor ms/file':>14} {'importer ms/file':>17}")
    for rc, s in summary.items():
        fc, ic = s["floor_cpu_s"], s["importer_cpu_s"]
        ratio = s["importer_cpu_over_floor"]
        print(f"{rc:9} {fc if fc is not None else '—':>12} {ic if ic is not None else '—':>15}"
              f" {format(ratio, '.2f') + 'x' if ratio else '—':>15}"
              f" {format(fc / n * 1000, '.2f') if fc else '—':>14}"
              f" {format(ic / n * 1000, '.2f') if ic else '—':>17}")


def print_times(summary: dict[str, dict[str, float | None]], runs: list[Run], n: int) -> None:
    def f(v: float | None, fmt: str, suffix: str = "") -> str:
        return "—" if v is None else format(v, fmt) + suffix

    print(f"\nmedians over valid runs, {n} files\n")
    print(
        f"{'receiver':9} {'legacy s':>9} {'floor s':>8} {'importer s':>10} "
        f"{'legacy/importer':>16} {'importer/floor':>15} {'importer RSS MB':>16} "
        f"{'tree RSS MB':>12}"
    )
    for rc, s in summary.items():
        print(
            f"{rc:9} {f(s['legacy_s'], '.2f'):>9} {f(s['floor_s'], '.2f'):>8} "
            f"{f(s['importer_s'], '.2f'):>10} "
            f"{f(s['legacy_over_importer'], '.1f', 'x faster'):>16} "
            f"{f(s['importer_over_floor'], '.2f', 'x'):>15} "
            f"{f(s['importer_rss_mb'], '.1f'):>16} {f(s['tree_rss_mb'], '.1f'):>12}"
        )
    for rc in summary:
        print(f"  {rc}: {RECEIVERS[rc]}")
    print(f"  {RSS_NOTE}")
    bad = [f"{r.receiver} {r.method}" for r in runs if not r.ok]
    if bad:
        print(f"  INVALID runs (excluded): {', '.join(bad)}")


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True).stdout
        except OSError:
            return "missing"
        line = next((ln.strip() for ln in out.splitlines() if ln.strip()), "?")
        return line.removeprefix("$dcmtk: ").removesuffix(" $")

    return {
        "dcmtk": first_line(["storescu", "--version"]),
        "orthanc": first_line(["/usr/sbin/Orthanc", "--version"]),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", type=int, help="default: 6 x 100 files, then 300 x 2")
    p.add_argument("--files-per-folder", type=int)
    p.add_argument("--files", type=int, help="total files spread over 10 folders (overrides)")
    p.add_argument("--rows", type=int, default=128, help="image is rows x rows, 16 bit")
    p.add_argument("--receiver", choices=["storescp", "orthanc", "both"], default="both")
    p.add_argument(
        "--methods",
        help="comma-separated subset of legacy,floor,importer (default: all three; legacy"
             " only where its script is found)",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--workdir", default="/tmp",
                   help="where corpora and runs live (e.g. /dev/shm: no disk noise)")
    p.add_argument("--keep", action="store_true", help="keep all run directories (debugging)")
    p.add_argument("--verify", choices=["auto", "none"], default="auto",
                   help="the importer's C-FIND verification (PACS_VERIFY), to measure its cost")
    p.add_argument("--reconcile-cost", action="store_true",
                   help="also run the importer with RECONCILE=off, paired, to measure what"
                        " asking each PACS about every patient ID costs")
    args = p.parse_args(argv)
    global KEEP, VERIFY
    KEEP = args.keep
    VERIFY = args.verify
    methods = [m for m in METHODS if m in (args.methods or ",".join(METHODS)).split(",")]
    if args.reconcile_cost:
        methods.append(RECONCILE_OFF)
    receivers = ["storescp", "orthanc"] if args.receiver == "both" else [args.receiver]
    if "legacy" in methods and not LEGACY.is_file():
        if args.methods:
            p.error(f"legacy pipeline not found: {LEGACY} (set LEGACY_PIPELINE)")
        methods.remove("legacy")
        print(f"legacy contender skipped: {LEGACY} not found. It is the old scripts' work"
              " (legacy-pipeline.sh, kept beside this repository in ../shared/bench/); to"
              " compare against it, set LEGACY_PIPELINE=/path/to/legacy-pipeline.sh.",
              flush=True)

    compile_importer()
    if args.folders is None and args.files_per_folder is None and args.files is None:
        # The default corpus, and a clinic's day of radiographs: many folders of 2 files.
        corpora = [(6, 100), (300, 2)]
    else:
        corpora = [(args.folders or 6, args.files_per_folder or 100)]
    status = 0
    for folders, per_folder in corpora:
        args.folders, args.files_per_folder = folders, per_folder
        status |= bench_corpus(args, methods, receivers)
    return status


def bench_corpus(args: argparse.Namespace, methods: list[str], receivers: list[str]) -> int:
    """Generate one corpus and time every method on every receiver."""
    tmp = Path(tempfile.mkdtemp(prefix="importer-bench-", dir=args.workdir))
    try:
        corpus = tmp / "corpus"
        t0 = time.perf_counter()
        n = generate(corpus, args)
        size = sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file())
        versions = tool_versions()
        print(
            f"corpus: {n} files, {len(list(corpus.iterdir()))} folders, {size / 1e6:.1f} MB, "
            f"generated in {time.perf_counter() - t0:.1f} s under {tmp}"
        )
        print("  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        runs: list[Run] = []
        for rc in receivers:
            print(f"{rc}: {RECEIVERS[rc]}", flush=True)
            runs += bench_receiver(rc, methods, corpus, n, tmp, args.repeat)
        summary = summarize(runs, receivers)
        print_table(summary, runs, n)
        for rc in receivers:
            on, off = median(runs, rc, "importer"), median(runs, rc, RECONCILE_OFF)
            if on and off:
                print(f"  {rc}: importer {on:.2f} s (RECONCILE=hold), {off:.2f} s"
                      f" (RECONCILE=off): reconciliation costs {100 * (on / off - 1):+.1f} %")
                summary[rc]["importer_reconcile_off_s"] = off
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "corpus": {
                            "files": n,
                            "folders": len(list(corpus.iterdir())),
                            "rows": args.rows,
                            "bytes": size,
                        },
                        "repeat": args.repeat,
                        "versions": versions,
                        "receivers": RECEIVERS,
                        "rss_note": RSS_NOTE,
                        "summary": summary,
                        "runs": [asdict(r) for r in runs],
                    },
                    indent=2,
                    ensure_ascii=False,
                )
                + "\n"
            )
            print(f"wrote {args.json}")
        return 0 if all(r.ok for r in runs) else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
