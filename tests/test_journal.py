"""The journal (SQLite in STATE_DIR): rows live while their file is in the import dir."""

from __future__ import annotations

from pathlib import Path

from importer.journal import FileKey, Journal


def _size(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("journal.sqlite3*"))


def test_a_large_batch_leaves_no_large_journal_behind(tmp_path: Path) -> None:
    """20,000 answers recorded, then the files archived (their rows forgotten): the file
    gives its pages back on close instead of keeping the largest batch's size forever."""
    keys = [FileKey(f"/import/#1-A^B/IM{i:06d}.dcm", 34_000, 1_000 + i, 2_000 + i)
            for i in range(20_000)]
    journal = Journal(tmp_path)
    journal.record("primary", [(key, True, 0, "Success") for key in keys])
    journal.close()
    assert _size(tmp_path) > 2_000_000

    journal = Journal(tmp_path)
    assert all(d.delivered for d in journal.lookup(keys, "primary").values())
    journal.forget(key.path for key in keys)
    journal.close()
    assert _size(tmp_path) < 100_000
    journal = Journal(tmp_path)
    assert not any(d.delivered for d in journal.lookup(keys, "primary").values())
    journal.close()
