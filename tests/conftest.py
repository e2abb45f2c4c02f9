"""Shared fixtures: a site (import/archive/failed/log/state dirs) and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.receivers import StoreSCP

IMPORTER = str(Path(sys.executable).parent / "importer")


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
        """Files still in the import dir (relative), ignoring nothing."""
        return sorted(str(p.relative_to(self.import_dir)) for p in self.import_dir.rglob("*")
                      if p.is_file() or p.is_symlink())

    def log_records(self) -> list[dict]:
        lines = (self.log_dir / "log.log").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "received") as receiver:
        yield receiver
