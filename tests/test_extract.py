"""extract.py alone: the rules on archives written here byte by byte (no DCMTK needed)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from importer.extract import Budget, Damaged, Refused, extract, is_tar, member_path


def budget(files: int = 100, size: int = 1 << 30, ratio: int = 100) -> Budget:
    return Budget(files, size, ratio)


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_member_paths() -> None:
    assert member_path("./Study//CT/IM1.dcm") == "Study/CT/IM1.dcm"
    assert member_path("Study\\CT\\IM1") == "Study/CT/IM1"
    assert member_path("a\nb/.unpacked/c") == "a_b/_.unpacked/c"
    for bad in ("../x", "a/../../x", "/etc/passwd", "C:\\Windows\\x", "a/..", "..\\x"):
        with pytest.raises(Refused):
            member_path(bad)


def test_a_tar_gz_bomb_is_stopped_while_streaming(tmp_path: Path) -> None:
    """A tar declares no compressed size: bytes out are weighed against bytes read so far,
    and the stream is stopped long before it fills the disk."""
    bomb = tar_gz(tmp_path / "bomb.tar.gz", {"zeros.dcm": b"\0" * (64 << 20)})
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Refused, match="UNPACK_MAX_RATIO"):
        extract(str(bomb), str(tmp_path / "out"), "gzip", budget())
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written < 8 << 20


def test_a_gzip_that_holds_no_tar_is_not_unpacked(tmp_path: Path) -> None:
    single = tmp_path / "IM1.dcm.gz"
    single.write_bytes(gzip.compress(b"\0" * 128 + b"DICM" + b"\0" * 1000))
    assert not is_tar(str(single), "gzip")
    assert is_tar(str(tar_gz(tmp_path / "t.tgz", {"a": b"x"})), "gzip")
    (tmp_path / "cut.tgz").write_bytes((tmp_path / "t.tgz").read_bytes()[:15])
    assert is_tar(str(tmp_path / "cut.tgz"), "gzip"), "damaged: extract() tells"


def test_links_inside_are_skipped_and_duplicates_refused(tmp_path: Path) -> None:
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"image"
        info = tarfile.TarInfo("CT/IM1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("CT/latest")
        link.type, link.linkname = tarfile.SYMTYPE, "IM1"
        tar.addfile(link)
        hard = tarfile.TarInfo("CT/copy")
        hard.type, hard.linkname = tarfile.LNKTYPE, "CT/IM1"
        tar.addfile(hard)
    out = extract(str(archive), str(tmp_path / "out"), "tar", budget())
    assert out.files == ["CT/IM1", "CT/copy"] and out.skipped == ["CT/latest"]
    assert (tmp_path / "out" / "CT" / "copy").read_bytes() == b"image"
    assert not os.path.islink(tmp_path / "out" / "CT" / "latest")

    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as zf:
        zf.writestr("a", b"1")
        with pytest.warns(UserWarning):
            zf.writestr("a", b"2")
    with pytest.raises(Refused, match="two members named 'a'"):
        extract(str(twice), str(tmp_path / "out2"), "ZIP", budget())


def test_a_zip_cut_short_is_damaged(tmp_path: Path) -> None:
    whole = tmp_path / "w.zip"
    with zipfile.ZipFile(whole, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM1", os.urandom(5000))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(Damaged, match="corrupt or truncated ZIP"):
        extract(str(cut), str(tmp_path / "out"), "ZIP", budget())
