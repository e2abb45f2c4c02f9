"""One installation of the importer: its directories, its environment, the real CLI, and a
running `importer watch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simsite.receivers import StoreSCP

IMPORTER = str(Path(sys.executable).parent / "importer")
DELAY = 2  # the quiet period a simulated site runs `watch` with, in seconds


@dataclass
class Site:
    """One installation of the importer: its directories and environment."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.import_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "IMPORT_DIR": str(self.import_dir),
            "ARCHIVE_DIR": str(self.archive_dir),
            "FAILED_DIR": str(self.failed_dir),
            "LOG_DIR": str(self.log_dir),
            "STATE_DIR": str(self.state_dir),
            "PACS_SERVER_IP": "127.0.0.1",
            "PACS_SERVER_PORT": "9",  # set per test to a real receiver
            "PACS_AET": "STORESCP",
            # Tests write their files a moment before the importer runs: the age signal is
            # off unless a test turns it on (tests/test_share.py does; leases still apply).
            "SETTLE_SECONDS": "0",
            "INCOMPLETE_GRACE": "0",
            **self.env,
        }

    import_dir = property(lambda self: self.root / "import")
    archive_dir = property(lambda self: self.root / "archived")
    failed_dir = property(lambda self: self.root / "failed")
    log_dir = property(lambda self: self.root / "log")
    state_dir = property(lambda self: self.root / "state")

    def use(self, receiver: StoreSCP, variable_prefix: str = "PACS") -> None:
        if variable_prefix == "PACS":
            self.env |= {"PACS_SERVER_IP": receiver.host, "PACS_SERVER_PORT": str(receiver.port),
                         "PACS_AET": receiver.aet}
        else:
            self.env |= {f"{variable_prefix}_IP": receiver.host,
                         f"{variable_prefix}_PORT": str(receiver.port),
                         f"{variable_prefix}_AET": receiver.aet}

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([IMPORTER, *(args or ("run-once",))], env=env or self.env,
                              capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL, cwd=self.root)

    def archived(self) -> dict[str, Path]:
        """'<folder>/<relative path>' -> archived file, across all batch directories."""
        found = {}
        for path in self.archive_dir.glob("*/*/**/*"):
            if path.is_file():
                batch_relative = path.relative_to(self.archive_dir)
                found[str(Path(*batch_relative.parts[1:]))] = path
        return found

    def failed(self) -> dict[str, Path]:
        found = {}
        for path in self.failed_dir.glob("*/*/**/*"):
            if path.is_file() and not path.name.endswith(".reason.txt"):
                found[str(Path(*path.relative_to(self.failed_dir).parts[1:]))] = path
        return found

    def remaining(self) -> list[str]:
        """Files (and symlinks) still in the import dir (relative), ignoring nothing; read
        while the importer may be moving them away (os.walk skips what vanishes meanwhile)."""
        found = []
        for top, dirs, files in os.walk(self.import_dir):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                found.append(os.path.relpath(os.path.join(top, name), self.import_dir))
        return sorted(found)

    def log_records(self) -> list[dict]:
        lines = (self.log_dir / "log.log").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]


class Watching:
    """A running `importer watch` process."""

    def __init__(self, site: Site, delay: float = DELAY, *args: str) -> None:
        self.site = site
        self.process = subprocess.Popen(
            [IMPORTER, "watch", "--rescan", "60", *args],
            env={**site.env, "DELAY": str(delay)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=site.root)
        self.output = ""
        wait_for(lambda: (site.log_dir / "log.log").exists()
                 and "Watching" in (site.log_dir / "log.log").read_text(), 10)

    def stop(self) -> float:
        """SIGTERM; returns seconds until the process exited."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.output, _ = self.process.communicate(timeout=30)
        return time.monotonic() - started

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)
