"""Archives dropped in a patient folder (issue 23): unpacked, sent under the folder's identity,
archived as they came; hostile or broken ones quarantined with the rule they broke.

Real archives (Info-ZIP's `zip`, Windows' compressed-folder shape, tar.gz, pydicom's public
samples), real DCMTK, a real storescp. Each test checks what the receiver got, what was
archived (the archive byte for byte) and quarantined (with its reason), and that nothing was
written outside the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from simsite.dicomgen import make_ct
from simsite.receivers import StoreSCP
from simsite.site import DELAY, IMPORTER, Site, Watching, wait_for

FOLDER = "#4242-Zip^Test"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def received_ids(receiver: StoreSCP) -> dict[str, str]:
    """SOP Instance UID -> PatientID of every instance the receiver got (each once)."""
    datasets = receiver.received_datasets()
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(uids) == len(set(uids)), "an instance was received twice"
    return {ds.SOPInstanceUID: ds.PatientID for ds in datasets}


def make_images(where: Path, n: int, rows: int = 16) -> dict[str, Path]:
    """n CT files under where/CT/ (one study): SOP UID -> path."""
    return {make_ct(where / "CT" / f"IM{i:04d}.dcm", rows=rows, instance_number=i): where
            / "CT" / f"IM{i:04d}.dcm" for i in range(1, n + 1)}


def info_zip(source: Path, target: Path, *options: str) -> Path:
    """`zip -r` as Info-ZIP writes it, run in source (member paths relative to it)."""
    if shutil.which("zip") is None:
        pytest.skip("Info-ZIP's zip is not installed (apt-get install zip)")
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["zip", "-q", "-r", *options, str(target.resolve()), "."], cwd=source,
                   check=True)
    return target


def windows_zip(source: Path, target: Path, top: str, method: int) -> Path:
    """Windows' "Send to > Compressed folder": one top-level folder entry, then its files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", method) as archive:
        archive.writestr(zipfile.ZipInfo(top + "/"), b"")
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, f"{top}/{path.relative_to(source).as_posix()}")
    return target


def evil_zip(target: Path, name: str, data: bytes = b"owned\n") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("ok.txt", b"fine\n")
        archive.writestr(zipfile.ZipInfo(name), data)
    return target


def reason_of(failed: Path) -> str:
    return failed.with_name(failed.name + ".reason.txt").read_text(encoding="utf-8")


def receipt(site: Site) -> dict:
    (path,) = site.archive_dir.glob(f"*/{FOLDER}.receipt.json")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("how", ["info-zip deflated", "info-zip stored", "windows deflated",
                                 "windows stored", "tar.gz"])
def test_an_archive_is_unpacked_sent_and_archived_as_it_came(
        site: Site, storescp: StoreSCP, tmp_path: Path, how: str) -> None:
    site.use(storescp)
    images = make_images(tmp_path / "src", 3)
    folder = site.import_dir / FOLDER
    loose = make_ct(folder / "loose.dcm", rows=16)
    if how.startswith("info-zip"):
        archive = info_zip(tmp_path / "src", folder / "study.zip",
                           *(["-0"] if "stored" in how else []))
        prefix = ""
    elif how.startswith("windows"):
        method = zipfile.ZIP_STORED if "stored" in how else zipfile.ZIP_DEFLATED
        archive = windows_zip(tmp_path / "src", folder / "study.zip", "Study", method)
        prefix = "Study/"
    else:
        archive = folder / "study.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tmp_path / "src" / "CT", "CT")
        prefix = ""
    digest = sha(archive)

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert received_ids(storescp) == {uid: "4242" for uid in [*images, loose]}
    archived = site.archived()
    name = archive.name
    assert sha(archived[f"{FOLDER}/{name}"]) == digest, "the archive is archived as it came"
    for i in range(1, 4):  # and what was sent, stamped, beside it
        stamped = archived[f"{FOLDER}/.unpacked/{name}/{prefix}CT/IM{i:04d}.dcm"]
        assert pydicom.dcmread(stamped).PatientID == "4242"
    assert site.remaining() == [] and not any(site.import_dir.iterdir())
    assert f"{FOLDER}: 4 acknowledged" in result.stderr
    assert "4 sent and archived, 1 unpacked archive archived unsent" in result.stderr
    entries = {e["path"]: e for e in receipt(site)["files"]}
    member = entries[f".unpacked/{name}/{prefix}CT/IM0001.dcm"]
    assert (member["archive"], member["member"], member["sent"]) == (
        name, f"{prefix}CT/IM0001.dcm", True)
    assert entries[name]["sent"] is False and "unpacked archive" in entries[name]["why"]
    assert site.run().returncode == 0
    assert not any((site.state_dir / "unpacked").iterdir()), "its state is forgotten"


def test_public_samples_in_a_zip_and_a_nested_zip(site: Site, storescp: StoreSCP,
                                                  tmp_path: Path) -> None:
    """pydicom's CT_small and MR_small in a ZIP, with a ZIP inside it (unpacked too) and a
    ZIP inside that one (too deep: quarantined with the reason). The two samples are two
    people (their sexes differ): a folder that holds them is held like any other, so this
    one allows it."""
    site.use(storescp)
    site.env["MIXED_PATIENTS"] = "allow"
    folder = site.import_dir / FOLDER
    inner_images = make_images(tmp_path / "inner", 2)
    deep = make_images(tmp_path / "deep", 1)
    deep_zip = info_zip(tmp_path / "deep", tmp_path / "inner" / "deeper.zip")
    info_zip(tmp_path / "inner", tmp_path / "outer" / "series2.zip")
    for sample in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(sample), tmp_path / "outer" / sample)
    (tmp_path / "outer" / "README.txt").write_text("from the portal\n")
    digest = sha(info_zip(tmp_path / "outer", folder / "portal download.zip"))
    samples = {pydicom.dcmread(get_testdata_file(s)).SOPInstanceUID
               for s in ("CT_small.dcm", "MR_small.dcm")}

    result = site.run()

    assert result.returncode == 1, "a quarantined archive is not a clean run"
    assert received_ids(storescp) == {uid: "4242" for uid in [*samples, *inner_images]}, \
        result.stderr
    assert not set(deep) & set(received_ids(storescp))
    archived = site.archived()
    assert sha(archived[f"{FOLDER}/portal download.zip"]) == digest
    failed = site.failed()
    (deep_rel,) = failed
    assert deep_rel == f"{FOLDER}/.unpacked/portal download.zip/.unpacked/series2.zip/deeper.zip"
    assert sha(failed[deep_rel]) == sha(deep_zip)
    assert "only one level of nesting is unpacked" in reason_of(failed[deep_rel])
    entries = {e["path"]: e for e in receipt(site)["files"]}
    nested = entries[".unpacked/portal download.zip/.unpacked/series2.zip/CT/IM0001.dcm"]
    assert (nested["archive"], nested["inner_archive"], nested["member"]) == (
        "portal download.zip", "series2.zip", "CT/IM0001.dcm")
    assert entries[".unpacked/portal download.zip/README.txt"]["sent"] is False
    assert site.remaining() == []


def escaped(tmp_path: Path) -> list[str]:
    """Files the hostile archives below would write if they got out."""
    return [str(p) for p in tmp_path.rglob("owned*")]


@pytest.mark.parametrize("name, rule", [
    ("../../owned.txt", "climbs out with '..'"),
    ("/tmp/owned-absolute.txt", "is absolute"),
    ("..\\..\\owned-backslash.txt", "climbs out with '..'"),
])
def test_zip_slip_is_quarantined_and_writes_nothing_outside(
        site: Site, storescp: StoreSCP, tmp_path: Path, name: str, rule: str) -> None:
    site.use(storescp)
    folder = site.import_dir / FOLDER
    good = make_ct(folder / "good.dcm", rows=16)
    archive = evil_zip(folder / "evil.zip", name)
    digest = sha(archive)

    result = site.run()

    assert result.returncode == 1
    assert received_ids(storescp) == {good: "4242"}, "the rest of the folder goes on"
    failed = site.failed()
    assert sha(failed[f"{FOLDER}/evil.zip"]) == digest
    reason = reason_of(failed[f"{FOLDER}/evil.zip"])
    assert rule in reason and "zip-slip" in reason and "nothing of it was sent" in reason
    assert escaped(tmp_path) == [] and not Path("/tmp/owned-absolute.txt").exists()
    assert site.remaining() == []


def test_links_pointing_out_of_a_tar_are_quarantined(site: Site, storescp: StoreSCP,
                                                     tmp_path: Path) -> None:
    site.use(storescp)
    folder = site.import_dir / FOLDER
    folder.mkdir(parents=True)
    for kind, linkname in (("symlink", "../../../etc/passwd"), ("hardlink", "../owned")):
        tar_path = folder / f"{kind}.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            info = tarfile.TarInfo("link")
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = linkname
            tar.addfile(info)
            data = b"owned\n"
            member = tarfile.TarInfo("link")  # written through the link if it were followed
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    result = site.run()

    assert result.returncode == 1
    assert received_ids(storescp) == {}
    failed = site.failed()
    assert "symbolic link 'link' points outside" in reason_of(failed[f"{FOLDER}/symlink.tar.gz"])
    assert "hard link 'link' points outside" in reason_of(failed[f"{FOLDER}/hardlink.tar.gz"])
    assert escaped(tmp_path) == [] and site.remaining() == []


def test_bomb_encrypted_too_many_and_truncated_are_quarantined(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    site.use(storescp)
    site.env["UNPACK_MAX_FILES"] = "5"
    folder = site.import_dir / FOLDER
    good = make_ct(folder / "good.dcm", rows=16)
    with zipfile.ZipFile(folder / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("IM0001.dcm", b"\0" * (16 << 20))  # 16 MiB from ~16 KB
    make_images(tmp_path / "secret", 1)
    info_zip(tmp_path / "secret", folder / "encrypted.zip", "-P", "secret")
    make_images(tmp_path / "many", 6)
    info_zip(tmp_path / "many", folder / "many.zip")
    make_images(tmp_path / "cut", 2, rows=64)
    whole = info_zip(tmp_path / "cut", tmp_path / "whole.zip").read_bytes()
    (folder / "truncated.zip").write_bytes(whole[: len(whole) - 200])
    digests = {p.name: sha(p) for p in folder.glob("*.zip")}

    result = site.run()

    assert result.returncode == 1
    assert received_ids(storescp) == {good: "4242"}
    failed = site.failed()
    assert {Path(rel).name for rel in failed} == set(digests)
    for name, digest in digests.items():
        assert sha(failed[f"{FOLDER}/{name}"]) == digest, f"{name} quarantined as it came"
    reasons = {name: reason_of(failed[f"{FOLDER}/{name}"]) for name in digests}
    assert "UNPACK_MAX_RATIO (100:1)" in reasons["bomb.zip"]
    assert "encrypted member 'CT/IM0001.dcm'" in reasons["encrypted.zip"]
    assert "more than UNPACK_MAX_FILES (5) files" in reasons["many.zip"]
    assert "corrupt or truncated ZIP" in reasons["truncated.zip"]
    assert not list(site.import_dir.rglob("*")), "no working folder is left behind"


def test_too_many_bytes_is_quarantined(site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    site.use(storescp)
    site.env["UNPACK_MAX_BYTES"] = "1M"
    make_images(tmp_path / "big", 1, rows=1024)  # 2 MiB of pixels
    info_zip(tmp_path / "big", site.import_dir / FOLDER / "big.zip", "-0")

    result = site.run()

    assert result.returncode == 1 and received_ids(storescp) == {}
    reason = reason_of(site.failed()[f"{FOLDER}/big.zip"])
    assert "more than UNPACK_MAX_BYTES (1048576 bytes)" in reason


def test_a_zip_still_being_written_waits(site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Cut short and young (INCOMPLETE_GRACE), or held open by its writer: it waits, nothing
    of it is sent or quarantined; once complete it goes in full."""
    site.use(storescp)
    site.env["INCOMPLETE_GRACE"] = "3600"
    folder = site.import_dir / FOLDER
    folder.mkdir(parents=True)
    images = make_images(tmp_path / "src", 3, rows=64)
    whole = info_zip(tmp_path / "src", tmp_path / "whole.zip").read_bytes()
    (folder / "arriving.zip").write_bytes(whole[: len(whole) // 2])
    held = open(folder / "held.zip", "wb")  # noqa: SIM115 - a writer holding it open
    try:
        held.write(whole)
        held.flush()

        result = site.run()

        assert result.returncode == 1
        assert received_ids(storescp) == {}
        assert site.failed() == {} and site.archived() == {}
        assert "2 still being written" in result.stderr
        assert not (folder / ".unpacked").exists() or not any(
            p.is_file() for p in (folder / ".unpacked").rglob("*"))
    finally:
        held.close()
    (folder / "arriving.zip").write_bytes(whole)
    os.unlink(folder / "held.zip")

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert received_ids(storescp) == {uid: "4242" for uid in images}


def test_kill_during_unpacking_then_the_next_run_delivers_everything_once(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    site.use(storescp)
    folder = site.import_dir / FOLDER
    images = make_images(tmp_path / "src", 300, rows=64)
    archive = info_zip(tmp_path / "src", folder / "study.zip", "-0")
    digest = sha(archive)
    work = folder / ".unpacked"

    proc = subprocess.Popen([IMPORTER, "run-once"], env=site.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=site.root)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            partial = [p for p in work.glob(".partial-*/CT/*")] if work.is_dir() else []
            if len(partial) >= 5:
                break
            assert proc.poll() is None, "run-once finished before it could be killed"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert received_ids(storescp) == {}, "no half-unpacked member is ever sent"
    assert sha(archive) == digest, "the archive is intact"
    assert list(work.glob(".partial-*")), "killed mid-unpack (the partial folder is there)"

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert received_ids(storescp) == {uid: "4242" for uid in images}
    assert sha(site.archived()[f"{FOLDER}/study.zip"]) == digest
    assert site.remaining() == []


def test_watch_takes_a_zip_once(site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Under `watch`, a folder with a ZIP moved in: its images delivered once, the folder
    gone, and the unpacking (inside the folder) does not make it due again."""
    site.use(storescp)
    images = make_images(tmp_path / "src", 4)
    staging = tmp_path / "staging" / FOLDER
    info_zip(tmp_path / "src", staging / "study.zip")
    watcher = Watching(site)
    try:
        shutil.move(staging, site.import_dir)
        wait_for(lambda: len(storescp.received()) >= 4, 20)
        wait_for(lambda: not (site.import_dir / FOLDER).exists(), 10)
        time.sleep(DELAY + 1)  # a quiet period of its own would run out now
    finally:
        watcher.stop()
    assert received_ids(storescp) == {uid: "4242" for uid in images}
    assert watcher.output.count(f"processing {FOLDER}") == 1, watcher.output
    assert f"{FOLDER}/study.zip" in site.archived()


def test_a_disk_failure_while_unpacking_leaves_everything_for_the_next_run(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """The state cannot be written (STATE_DIR/unpacked is a file here): the archive is left
    in place for retry, untouched, nothing of it sent; the rest of the folder goes on."""
    site.use(storescp)
    folder = site.import_dir / FOLDER
    good = make_ct(folder / "good.dcm", rows=16)
    images = make_images(tmp_path / "src", 2)
    digest = sha(info_zip(tmp_path / "src", folder / "study.zip"))
    site.state_dir.mkdir(parents=True)
    (site.state_dir / "unpacked").write_text("in the way\n")

    result = site.run()

    assert result.returncode == 1
    assert received_ids(storescp) == {good: "4242"}
    assert "cannot unpack its archives now" in result.stderr
    assert sha(folder / "study.zip") == digest and site.failed() == {}
    (site.state_dir / "unpacked").unlink()

    result = site.run()

    assert result.returncode == 0, result.stderr
    assert received_ids(storescp) == {uid: "4242" for uid in [good, *images]}
    assert site.remaining() == []
