"""Shared fixtures: a site (simsite.site) and a storescp receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simsite.receivers import StoreSCP
from simsite.site import Site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path / "received") as receiver:
        yield receiver
