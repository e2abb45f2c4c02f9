"""Plays a scenario against the real importer: the site, the timeline, then quiescence.

Every event runs in its own thread at its time, so faults overlap as they do at a site. When
the timeline ends every fault stops (receivers up and in their normal mood, writers released,
a `watch` under strace or killed replaced by a clean one) and the importer is left to reach
its verdicts, within `LIVENESS` seconds; then the oracle reads every place.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chaos.pacs import Receiver
from chaos.scenario import Event, Scenario
from chaos.share import Share, Truth
from simsite.site import IMPORTER, Site

LIVENESS = 150.0  # seconds after the faults stop within which every file has its verdict
SITE_ENV = {  # short clocks, so that a scenario's retries and backoffs fit in a few minutes
    "DELAY": "2", "SETTLE_SECONDS": "1", "INCOMPLETE_GRACE": "12", "MAX_ATTEMPTS": "3",
    "VERIFY_ATTEMPTS": "2", "VERIFY_DELAY": "1", "PROBE_INTERVAL": "2",
    "CONNECT_TIMEOUT": "3", "ACSE_TIMEOUT": "5", "DIMSE_TIMEOUT": "4", "ALERT_AFTER": "3600",
}


@dataclass
class Run:
    """What happened while a scenario played: for the oracle and the report."""

    scenario: Scenario
    site: Site
    truth: Truth
    receivers: dict[str, Receiver]
    outputs: list[tuple[str, Path]] = field(default_factory=list)  # (what, its output file)
    exit_codes: list[tuple[str, int]] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the campaign's own failures
    writer_failures: list[str] = field(default_factory=list)  # files moved while being written
    quiescent_after: float | None = None
    final_exit: int | None = None

    def close(self) -> None:
        """Stop the receivers (after the oracle has asked them what they hold)."""
        for r in self.receivers.values():
            r.stop()


class Importer:
    """The importer under test: a `watch` process (maybe under strace) or run-once in a loop."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.count = 0
        self.killed = False  # the current process was killed by the campaign

    def _start(self, argv: list[str], what: str) -> subprocess.Popen[bytes]:
        self.count += 1
        out = self.run.site.root / f"{what}-{self.count}.out"
        self.run.outputs.append((what, out))
        with open(out, "wb") as fh:
            return subprocess.Popen(argv, env=self.run.site.env, stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=self.run.site.root,
                                    start_new_session=True)

    def watch(self, strace: str = "") -> None:
        argv = [IMPORTER, "watch", "--rescan", "10"]
        if strace:  # system calls failing where the archive, quarantine and state live
            call, first, every = strace.split("|")
            error = "ENOSPC" if "enospc" in self.strace_kind else "EIO"
            argv = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e",
                    f"trace={call}", "-e", f"inject={call}:error={error}:when={first}+{every}",
                    *argv]
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None and not self.killed:
                self.run.exit_codes.append(("watch (exited by itself)", self.proc.returncode))
            self.killed = False
            self.proc = self._start(argv, "watch")

    strace_kind = ""

    def run_once(self, what: str = "run-once") -> int:
        proc = self._start([IMPORTER, "run-once"], what)
        if what == "run-once":
            with self.lock:
                self.proc = proc
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            self.run.errors.append(f"{what} did not finish within 300 s")
        self.run.exit_codes.append((what, code))
        return code

    def kill(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                self.killed = True

    def stop(self) -> int | None:
        """SIGTERM the watch (not its strace), as `docker stop` does; its exit code."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.run.errors.append("watch did not stop within 60 s of SIGTERM")
                os.killpg(self.proc.pid, signal.SIGKILL)
                return self.proc.wait()


def play(scenario: Scenario, root: Path) -> Run:
    """Run one scenario in `root` (created); the Run tells what happened, the oracle judges
    (its receivers are still up to be asked: `Run.close()` stops them)."""
    root.mkdir(parents=True)
    receivers = {d.name: Receiver(d, root / "pacs") for d in scenario.destinations}
    site = Site(root / "site", env=dict(SITE_ENV))
    for r in receivers.values():
        if r.destination.name in ("primary", "backup"):
            site.use(r, "PACS" if r.destination.name == "primary" else "BACKUP_PACS")
    optional = [r for r in receivers.values() if not r.destination.required]
    if optional:
        config = site.root / "importer.toml"
        config.write_text("".join(
            f'[[destination]]\nname = "{r.destination.name}"\nhost = "{r.host}"\n'
            f'port = {r.port}\naet = "{r.aet}"\nrequired = false\n' for r in optional))
        site.env["IMPORTER_CONFIG"] = str(config)
    if any(e.kind == "clock-jump" for e in scenario.events):
        site.env |= clock_env(site.root / "clock")
    truth = Truth(scenario)
    run = Run(scenario, site, truth, receivers)
    staging = site.root / "staging"
    share = Share(truth, site.import_dir, staging)
    try:
        for r in receivers.values():
            r.start()
        finder = next((r for r in receivers.values() if r.kind == "orthanc"), None)
        for pid, name in scenario.preload:
            assert finder is not None
            truth.preloaded.add(finder.preload(pid, name, staging))
        staged = {i: share.stage(i, f) for i, f in enumerate(scenario.folders)}
        _timeline(run, share, staged)
    except Exception:
        run.errors.append("the campaign itself failed:\n" + traceback.format_exc())
    return run


def _timeline(run: Run, share: Share, staged: dict[int, dict[str, Path]]) -> None:
    scenario = run.scenario
    importer = Importer(run)
    strace = next((e for e in scenario.events if e.kind.startswith("syscall-")), None)
    if scenario.mode == "watch":
        if strace is not None:
            importer.strace_kind = strace.kind
            _count(run, strace.kind)
        importer.watch(strace.arg if strace else "")
    start = time.monotonic()
    stop_looping = threading.Event()
    threads = [threading.Thread(target=_guarded, args=(run, _arrive, share, staged, i, start))
               for i in range(len(scenario.folders))]
    threads += [threading.Thread(target=_guarded, args=(run, _event, share, importer, e, start))
                for e in scenario.events if not e.kind.startswith("syscall-")]
    if scenario.mode == "run-once":
        threads.append(threading.Thread(target=_loop, args=(importer, stop_looping)))
    for t in threads:
        t.start()
    if strace is not None:  # the disk heals: a clean watch takes over
        _sleep_until(start, strace.until)
        importer.kill()
        importer.watch()
    _sleep_until(start, scenario.length)
    stop_looping.set()
    for t in threads:
        t.join(timeout=120)
    for r in run.receivers.values():  # every fault stops
        if not r.up or r.kind == "storescp":
            r.start()
    for key in list(share.stalled):
        share.release(*key)
    run.writer_failures = share.writer_failures
    if scenario.mode == "watch" and importer.proc is not None and importer.proc.poll() is not None:
        run.exit_codes.append(("watch (exited by itself)", importer.proc.returncode))
        importer.watch()
    _quiesce(run, importer)


def _quiesce(run: Run, importer: Importer) -> None:
    began = time.monotonic()
    stable_since, last = time.monotonic(), None
    while time.monotonic() - began < LIVENESS:
        if run.scenario.mode == "run-once":
            run.final_exit = importer.run_once()
        state = (tuple(_left(run)), len(run.site.archived()), len(run.site.failed()))
        if state != last:
            stable_since, last = time.monotonic(), state
        elif not state[0] and time.monotonic() - stable_since > 3:
            run.quiescent_after = time.monotonic() - began
            break
        time.sleep(1 if run.scenario.mode == "run-once" else 0.5)
    if run.scenario.mode == "watch":
        code = importer.stop()
        if code is not None:
            run.exit_codes.append(("watch (SIGTERM)", code))


def _left(run: Run) -> list[str]:
    """Files in the import dir that should not stay there: any but those of a folder that
    may stay (see `Truth.stays`) and that the log says is held."""
    held = held_folders(run)
    stay = {name for i, names in run.truth.names.items() if run.truth.stays(i)
            for name in names if name in held}
    return [p for p in run.site.remaining() if p.split("/", 1)[0] not in stay]


def held_folders(run: Run) -> set[str]:
    """The folders the log says are held (the reason a person reads), and refused names
    (one warning each, and they stay)."""
    held = {f.name for f in run.scenario.folders if not f.matched}
    names = {name for names in run.truth.names.values() for name in names}
    try:
        lines = (run.site.log_dir / "log.log").read_text(encoding="utf-8",
                                                         errors="replace").splitlines()
    except OSError:
        return held
    for line in lines:
        try:
            message = str(json.loads(line).get("message", ""))
        except ValueError:  # a line still being written
            continue
        if "held" in message:
            held |= {name for name in names if name in message}
    return held


def _loop(importer: Importer, stop: threading.Event) -> None:
    while not stop.is_set():
        importer.run_once()
        stop.wait(0.5)


def _guarded(run: Run, target: Callable[..., None], *args: object) -> None:
    """An event's thread: what fails in it is the run's error, not a thread that dies
    silently (chaos seed 24: a writer that could not create its file, the rest of its
    folder never written, and the oracle looking for files nobody wrote)."""
    try:
        target(run, *args)
    except Exception:
        run.errors.append(f"{target.__name__} failed:\n{traceback.format_exc()}")


def _arrive(run: Run, share: Share, staged: dict[int, dict[str, Path]], index: int,
            start: float) -> None:
    folder = run.scenario.folders[index]
    stall = next(((e.arg, e.kind == "stall-closed") for e in run.scenario.events
                  if e.kind.startswith("stall-") and e.target == folder.name), None)
    _sleep_until(start, folder.arrive)
    share.arrive(index, folder, staged[index], stall, 0.35 if folder.slow else 0.0)


def _event(run: Run, share: Share, importer: Importer, e: Event, start: float) -> None:
    _sleep_until(start, e.at)
    index = next((i for i, f in enumerate(run.scenario.folders) if f.name == e.target), -1)
    done = True
    if e.kind in ("down", "refuse-association", "abort", "stall-dimse"):
        receiver = run.receivers[e.target]
        if e.kind == "down":
            receiver.stop()
        else:
            receiver.start(e.kind)
        _sleep_until(start, e.until)
        receiver.start()
    elif e.kind.startswith("stall-"):
        _sleep_until(start, e.until)
        share.release(index, e.arg)
    elif e.kind == "replace":
        rel, _, new = e.arg.partition("|")
        done = share.replace(index, rel, bool(new))
    elif e.kind == "add-during-run":
        count, uid = e.arg.split("|")
        done = share.add(index, run.scenario.folders[index], int(count), uid)
    elif e.kind == "delete":
        share.delete(index)
    elif e.kind == "rename":
        done = share.rename(index, e.arg)
    elif e.kind == "sigkill":
        importer.kill()
        if run.scenario.mode == "watch":
            time.sleep(float(e.arg))
            importer.watch()
    elif e.kind == "clock-jump":  # the step stays: nobody sets a clock back after NTP
        set_clock(run.site.root / "clock", float(e.arg))
    elif e.kind == "two-importers":
        importer.run_once("second importer (run-once)")
    if done:
        _count(run, e.kind)


def clock_env(clock: Path, offset: float = 0.0) -> dict[str, str]:
    """The environment of a process whose wall clock is offset seconds off the kernel's
    (clockjump.c), the offset kept in clock, where set_clock moves it."""
    set_clock(clock, offset)
    return {"LD_PRELOAD": str(clock_shim()), "CLOCKJUMP_FILE": str(clock)}


def set_clock(clock: Path, offset: float) -> None:
    """Step the clock at once (replaced whole: the shim never reads half a number)."""
    new = clock.with_name(clock.name + ".new")
    new.write_text(f"{offset:g}\n")
    new.replace(clock)


def clock_shim() -> Path:
    """clockjump.c built once per version of it (gcc, as the machine has it)."""
    source = Path(__file__).with_name("clockjump.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    shim = Path(tempfile.gettempdir()) / f"clockjump-{digest}.so"
    if not shim.exists():
        building = shim.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(building),
                        str(source), "-ldl"], check=True)
        building.replace(shim)
    return shim


def _count(run: Run, kind: str) -> None:
    run.injected[kind] = run.injected.get(kind, 0) + 1


def _sleep_until(start: float, at: float) -> None:
    delay = start + at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
