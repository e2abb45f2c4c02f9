"""A folder's listing and the journal's lookups, on the path shapes a share holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from importer.journal import FileKey, Journal
from importer.snapshot import list_files

NAMES = ["x.dcm", "s 1/y.dcm", "s 1/deep/z", "s 1/deep/\udcff\udcfename", "$(id)/'q'"]


def _tree(top: Path) -> None:
    for name in NAMES:
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(b"DICM")
    os.symlink(top / "s 1", top / "link")
    os.mkfifo(top / "fifo")


@pytest.mark.parametrize("spelling", ["absolute", "trailing slash", "relative", "dot", "dotdot"])
def test_each_file_is_listed_with_its_path_below_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    folder = tmp_path / "#1001-Doe^John"
    _tree(folder)
    monkeypatch.chdir(tmp_path)
    top = {"absolute": str(folder), "trailing slash": f"{folder}/", "relative": folder.name,
           "dot": f"./{folder.name}", "dotdot": f"{tmp_path}/../{tmp_path.name}/{folder.name}"}
    files, left = list_files(Path(top[spelling]) if spelling != "trailing slash"
                             else top[spelling])  # type: ignore[arg-type]
    assert sorted(f.rel for f in files) == sorted(NAMES)
    for f in files:
        assert os.path.samefile(f.path, folder / f.rel)
    assert sorted(left) == [("fifo", "not a regular file"), ("link", "symbolic link, not followed")]


def test_a_lookup_finds_its_rows_and_only_its_rows(tmp_path: Path) -> None:
    # "#1-A" and "#1-AB": one name extends the other; a file name starts with byte 0xff.
    root = tmp_path / "import"
    paths = [f"{root}/#1-A/a.dcm", f"{root}/#1-A/sub/b.dcm", f"{root}/#1-A/\udcffc.dcm",
             f"{root}/#1-AB/d.dcm", f"{root}/#2-B/e.dcm"]
    keys = {p: FileKey(p, 10, 20, 30) for p in paths}
    (tmp_path / "state").mkdir()
    journal = Journal(tmp_path / "state")
    try:
        journal.record("pacs", [(key, True, 0, "0000") for key in keys.values()])
        for group in ([paths[0]], paths[:3], paths[2:4], paths, [paths[1], paths[4]]):
            found = journal.lookup([keys[p] for p in group], "pacs")
            assert set(found) == {keys[p] for p in group}
            assert all(found[keys[p]].delivered for p in group), group
        other = FileKey(f"{root}/#1-A/never-sent.dcm", 1, 2, 3)
        assert not journal.lookup([other, keys[paths[3]]], "pacs")[other].delivered
    finally:
        journal.close()
