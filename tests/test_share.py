"""The share: files still being written, held open, replaced or never finished.

Writers are separate processes started by the test (as smbd or a modality would be): they
write part of a real DICOM file, stall, and finish on a signal. Every test asserts what the
receiver got (whole instances only), what was archived (whole files), that nothing was
quarantined early and that nothing was lost.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from importer import dcmtk, pipeline, share
from importer.config import load_settings
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import StoreSCP
from simsite.refusing_scp import RefusingSCP
from simsite.site import Site, Watching, wait_for
from simsite.writers import Writer, pixel_offset  # noqa: F401

FOLDER = "#4242-Stall^Test"
ROWS = 256  # 128 KB of pixel data per file

@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Complete files, outside the import dir, for writers to copy from."""
    src = tmp_path / "sources"
    make_patient_folder(src, FOLDER, 4, rows=ROWS, patient_id="OLD", patient_name="Old^Name")
    return src / FOLDER


def whole(ds: pydicom.Dataset) -> bool:
    return "PixelData" in ds and len(ds.PixelData) == ds.Rows * ds.Columns * 2


def assert_whole_and_stamped(site: Site, receiver: StoreSCP, sources: Path,
                             expect: set[str]) -> None:
    """The receiver holds exactly the expected instances, each whole and stamped; the
    archive holds each as a whole file; nothing quarantined; nothing left."""
    received = receiver.received_datasets()
    assert all(whole(ds) for ds in received), "an instance without its pixel data was sent"
    assert all(ds.PatientID == "4242" for ds in received)
    original = {pydicom.dcmread(sources / name).SOPInstanceUID: name for name in expect}
    assert {ds.SOPInstanceUID for ds in received} == set(original)
    archived = {Path(k).name: v for k, v in site.archived().items()}
    assert set(archived) == expect
    for name, path in archived.items():
        ds = pydicom.dcmread(path)
        assert ds.PixelData == pydicom.dcmread(sources / name).PixelData, name
    assert site.failed() == {}
    assert site.remaining() == []


def receive_log(site: Site) -> str:
    return "\n".join(r["message"] for r in site.log_records())


# --- run-once --------------------------------------------------------------------------------


def test_run_once_during_a_copy_leaves_the_folder_and_sends_it_whole_later(
        site: Site, storescp: StoreSCP, sources: Path) -> None:
    """A copy in progress when run-once starts (stalled in the pixel data, writer holding
    the file open): exit 1, the file left untouched, and the folder's settled files wait
    with it (the rest of the copy may be another patient's CD: chaos seed 35); once the
    copy has finished, the next run sends the folder whole. Signal: the read lease."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm", "IM00003.dcm"):
        shutil.copy(sources / name, target / name)
    src = sources / "IM00004.dcm"
    writer = Writer(src, target / "IM00004.dcm", pixel_offset(src) + 5000)
    before = (target / "IM00004.dcm").read_bytes()

    result = site.run()
    assert result.returncode == 1, result.stderr
    assert "IM00004.dcm: still being written or incomplete" in result.stderr
    assert "open for writing by another process" in result.stderr
    assert (target / "IM00004.dcm").read_bytes() == before  # not stamped, not moved
    assert not list(target.glob("*.bak"))
    assert "waits for the rest of its folder (IM00004.dcm: still being written" in receive_log(site)
    assert storescp.received() == [] and site.failed() == {} and site.archived() == {}

    writer.release()
    result = site.run()
    assert result.returncode == 0, result.stderr
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {f"IM0000{i}.dcm" for i in range(1, 5)})


def test_run_once_during_a_copy_of_two_cds_sends_nothing_of_the_first(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Found by the fault campaign (chaos seed 35): two patients' CDs copied into one
    folder, run-once while the second CD's first file was still arriving. The first CD's
    settled files went out under the folder's ID; the folder was held as two patients only
    on the next run, too late. Now nothing of it goes while the copy runs, and once the
    copy is done the folder is held, untouched and unsent."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    for i in (1, 2):
        make_ct(target / "CD1" / f"IM0000{i}.dcm", rows=16, birth_date="19500101", sex="F")
    second = tmp_path / "second-cd.dcm"
    make_ct(second, rows=ROWS, birth_date="19990909", sex="M")
    writer = Writer(second, target / "CD2" / "IM00001.dcm", pixel_offset(second) + 5000)

    first = site.run()

    assert first.returncode == 1, first.stderr
    assert storescp.received() == [] and site.archived() == {}
    assert "2 settled files of the folder wait for the rest of it" in first.stderr
    writer.release()
    second_run = site.run()
    assert second_run.returncode == 1, second_run.stderr
    assert f"{FOLDER}: held" in second_run.stderr
    storescp.stop()
    assert storescp.received() == [] and site.archived() == {} and site.failed() == {}
    assert len([p for p in site.remaining() if p.startswith(FOLDER)]) == 3


def test_header_only_file_waits_then_is_quarantined_after_the_grace(
        site: Site, storescp: StoreSCP, sources: Path) -> None:
    """A writer that wrote the header, closed the file and never came back: the image
    without pixel data is never sent; it stays while young, and is quarantined with a reason
    once unchanged for INCOMPLETE_GRACE. A file cut in the pixel data likewise.
    Signal: what the file holds (an image without PixelData; a truncated element)."""
    site.use(storescp)
    site.env["INCOMPLETE_GRACE"] = "4"
    target = site.import_dir / FOLDER
    target.mkdir()
    header = sources / "IM00001.dcm"
    (target / "header.dcm").write_bytes(header.read_bytes()[:pixel_offset(header)])
    cut = sources / "IM00002.dcm"
    (target / "cut.dcm").write_bytes(cut.read_bytes()[:pixel_offset(cut) + 7000])
    (target / "empty.dcm").write_bytes(b"")  # a copy that has not begun
    shutil.copy(sources / "IM00003.dcm", target / "IM00003.dcm")

    result = site.run()
    assert result.returncode == 1, result.stderr
    assert "an image without its pixel data yet" in receive_log(site)
    assert "DCMTK cannot read it yet" in receive_log(site)
    assert "no DICM magic yet (0 bytes)" in receive_log(site)
    assert site.failed() == {} and not any("empty" in k for k in site.archived())
    assert sorted(site.remaining()) == sorted(
        f"{FOLDER}/{n}" for n in ("header.dcm", "cut.dcm", "empty.dcm"))

    time.sleep(4.2)
    result = site.run()
    assert result.returncode == 1, result.stderr
    failed = {Path(k).name: v for k, v in site.failed().items()}
    assert set(failed) == {"header.dcm", "cut.dcm"}
    reason = failed["header.dcm"].with_name("header.dcm.reason.txt").read_text()
    assert "image without pixel data" in reason
    assert "DCMTK cannot read" in failed["cut.dcm"].with_name("cut.dcm.reason.txt").read_text()
    assert {Path(k).name for k in site.archived()} == {"IM00003.dcm", "empty.dcm"}
    storescp.stop()
    received = storescp.received_datasets()
    assert len(received) == 1 and all(whole(ds) for ds in received)


def test_settled_notes_do_not_wait_but_a_copy_not_begun_does(
        site: Site, storescp: StoreSCP, sources: Path) -> None:
    """A settled 11-byte notes.txt beside the images is plainly not a DICOM file still
    arriving: with INCOMPLETE_GRACE an hour it is archived unsent with the images in the
    same run, and run-once exits 0 (issue 23). A file created but still empty, and one
    preallocated with zeros where the magic goes, may still become DICOM: they wait, and so
    does the note beside them; once written they are sent and everything is archived.
    Signal: what the file's first bytes say."""
    site.use(storescp)
    site.env["INCOMPLETE_GRACE"] = "3600"
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    (target / "notes.txt").write_bytes(b"see report\n")

    result = site.run()
    assert result.returncode == 0, result.stderr
    assert "1 text file archived unsent" in result.stderr
    assert {Path(k).name for k in site.archived()} == {"IM00001.dcm", "IM00002.dcm", "notes.txt"}
    assert site.remaining() == [] and len(storescp.received()) == 2

    (target / "later").mkdir(parents=True)
    shutil.copy(sources / "IM00003.dcm", target / "IM00003.dcm")
    (target / "later" / "IM00004.dcm").write_bytes(b"")  # created, not written yet
    (target / "prealloc.dcm").write_bytes(b"\0" * 4096)  # preallocated by its writer
    (target / "notes2.txt").write_bytes(b"second CD\n")
    result = site.run()
    assert result.returncode == 1, result.stderr
    log = receive_log(site)
    assert "no DICM magic yet (0 bytes)" in log and "no DICM magic yet (4096 bytes)" in log
    assert "1 text file kept until the rest of the folder is done" in result.stderr
    assert sorted(site.remaining()) == sorted(
        f"{FOLDER}/{n}" for n in ("later/IM00004.dcm", "prealloc.dcm", "notes2.txt"))
    assert len(storescp.received()) == 3 and site.failed() == {}

    shutil.copy(sources / "IM00004.dcm", target / "later" / "IM00004.dcm")
    make_ct(target / "prealloc.dcm", rows=ROWS)  # its writer fills it in
    result = site.run()
    assert result.returncode == 0, result.stderr
    storescp.stop()
    archived = {Path(k).name for k in site.archived()}
    assert archived == {f"IM0000{i}.dcm" for i in range(1, 5)} | {
        "prealloc.dcm", "notes.txt", "notes2.txt"}
    received = storescp.received_datasets()
    assert len(received) == 5 and all(ds.PatientID == "4242" and whole(ds) for ds in received)
    assert site.remaining() == [] and site.failed() == {}


def test_objects_without_pixel_data_are_not_held(site: Site, storescp: StoreSCP,
                                                 tmp_path: Path) -> None:
    """An SR or KO legitimately has no pixel data: sent at once, never taken for a partial
    image, whatever INCOMPLETE_GRACE says."""
    site.use(storescp)
    site.env["INCOMPLETE_GRACE"] = "3600"

    def as_sr(ds: pydicom.Dataset) -> None:
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored",
                        "HighBit", "PixelRepresentation", "SamplesPerPixel",
                        "PhotometricInterpretation"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.Modality = "SR"

    make_ct(site.import_dir / FOLDER / "report.dcm", extra=as_sr)
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert {Path(k).name for k in site.archived()} == {"report.dcm"}


def test_replaced_between_stamp_and_send_is_not_sent_until_stamped(
        site: Site, storescp: StoreSCP, sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced (new inode, same name) after it was stamped: the replacement, which
    carries another identity, is never sent as it is; it is stamped and sent next time.
    Signal: the identity re-check before sending."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    real_stamp = pipeline.stamp

    def stamp_then_replace(folders: list[pipeline.Folder], *args: object) -> None:
        real_stamp(folders, *args)
        replacement = target / ".new"
        shutil.copy(sources / "IM00003.dcm", replacement)
        os.replace(replacement, target / "IM00002.dcm")

    monkeypatch.setattr(pipeline, "stamp", stamp_then_replace)
    report = pipeline.run_batch(load_settings({}, site.env))
    monkeypatch.undo()
    assert report.exit_code == 1
    assert "replaced after it was stamped" in report.folders[0].writing[str(target / "IM00002.dcm")]
    assert [ds.SOPInstanceUID for ds in storescp.received_datasets()] == [
        pydicom.dcmread(sources / "IM00001.dcm").SOPInstanceUID]

    assert site.run().returncode == 0
    storescp.stop()
    received = storescp.received_datasets()
    assert all(ds.PatientID == "4242" and whole(ds) for ds in received)
    archived = {Path(k).name: v for k, v in site.archived().items()}
    assert set(archived) == {"IM00001.dcm", "IM00002.dcm"}
    assert pydicom.dcmread(archived["IM00002.dcm"]).SOPInstanceUID == pydicom.dcmread(
        sources / "IM00003.dcm").SOPInstanceUID


@pytest.mark.parametrize(("moment", "again"), [
    ("before the read-back", "IM00003.dcm"),  # chaos seed 209
    ("right after dcmodify's call", "IM00003.dcm"),  # chaos seed 46: a newer version
    ("right after dcmodify's call", "IM00002.dcm"),  # chaos seed 128: the same bytes again
])
def test_replaced_while_being_stamped_keeps_the_new_version_and_waits(
        site: Site, storescp: StoreSCP, sources: Path, monkeypatch: pytest.MonkeyPatch,
        moment: str, again: str) -> None:
    """Found by the fault campaign: a file replaced (new inode) after dcmodify wrote the
    stamped file was quarantined as "the identity could not be written", and the original
    was put back over the replacement: the newer version was lost. Chaos seed 209: the
    copy landed before the read-back; seed 46: between dcmodify's write and the look that
    follows its call, so the timing could not tell, and now its content does (no stamp,
    no Original Attributes item); seed 128: the same, with the same bytes copied again (not
    lost, but quarantined as "the identity could not be written"). The replacement stays,
    untouched, for its own quiet period, and goes stamped on the next run."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    newer = pydicom.dcmread(sources / again).SOPInstanceUID

    def replace() -> None:
        shutil.copy(sources / again, target / ".new")
        os.replace(target / ".new", target / "IM00002.dcm")

    if moment == "before the read-back":
        real_dump = dcmtk.dump_tags

        def replace_then_read_back(paths: list[str], *args: object, **kw: object) -> object:
            if os.path.exists(target / "IM00002.dcm.bak"):  # the read-back after dcmodify
                replace()
            return real_dump(paths, *args, **kw)

        monkeypatch.setattr(dcmtk, "dump_tags", replace_then_read_back)
    else:
        real_stamp = dcmtk.stamp_identity

        def stamp_then_replace(paths: list[str], *args: object, **kw: object) -> object:
            runs = real_stamp(paths, *args, **kw)
            if str(target / "IM00002.dcm") in paths:
                replace()
            return runs

        monkeypatch.setattr(dcmtk, "stamp_identity", stamp_then_replace)
    report = pipeline.run_batch(load_settings({}, site.env))
    monkeypatch.undo()
    assert report.exit_code == 1
    assert site.failed() == {}
    assert "replaced while being stamped" in report.folders[0].writing[str(target / "IM00002.dcm")]
    assert pydicom.dcmread(target / "IM00002.dcm").SOPInstanceUID == newer  # not overwritten
    assert not (target / "IM00002.dcm.bak").exists()

    assert site.run().returncode == 0
    storescp.stop()
    assert newer in {ds.SOPInstanceUID for ds in storescp.received_datasets()
                     if ds.PatientID == "4242"}
    archived = {Path(k).name: v for k, v in site.archived().items()}
    assert pydicom.dcmread(archived["IM00002.dcm"]).SOPInstanceUID == newer


def test_a_directory_emptied_while_the_folder_is_still_arriving_stays(
        site: Site, storescp: StoreSCP, sources: Path) -> None:
    """Found by the fault campaign (chaos seed 24): a folder copied series by series; the
    first file of SER2 settled and was archived, the directory left empty was removed, and
    the copy's next file into SER2 failed ("No such file or directory"). While any file of
    the folder is still arriving, the folder waits whole (chaos seed 35) and its directories
    stay; once all is done, they go."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    (target / "SER2").mkdir(parents=True)
    shutil.copy(sources / "IM00001.dcm", target / "SER2" / "IM00001.dcm")
    writer = Writer(sources / "IM00002.dcm", target / "SER1" / "IM00002.dcm",
                    pixel_offset(sources / "IM00002.dcm"))  # the copy is at SER1 now

    first = site.run()

    assert first.returncode == 1, first.stdout + first.stderr  # SER1's file is arriving
    assert site.archived() == {}
    assert (target / "SER2" / "IM00001.dcm").is_file()  # the copy's next file can go there
    writer.release()
    shutil.copy(sources / "IM00003.dcm", target / "SER2" / "IM00003.dcm")
    assert site.run().returncode == 0
    assert sorted(Path(k).name for k in site.archived()) == [
        "IM00001.dcm", "IM00002.dcm", "IM00003.dcm"]
    assert not target.exists()  # all done: the folder and its directories go


class ReplacingPACS(RefusingSCP):
    """Takes every file; on the first one, a person copies the folder's second file again
    (a new inode, unstamped) before storescu has read it."""

    def __init__(self, replace: Path, source: Path) -> None:
        super().__init__(aet="STORESCP")
        self.replace, self.source, self.done = replace, source, False

    def _on_store(self, event: Any) -> int:
        if not self.done:
            self.done = True
            shutil.copy(self.source, self.replace.with_name(".again"))
            os.replace(self.replace.with_name(".again"), self.replace)
        return super()._on_store(event)


def test_replaced_while_being_sent_the_pacs_gets_the_stamped_version(
        site: Site, sources: Path) -> None:
    """Found by the fault campaign (chaos seeds 54, 158, 209, 211): storescu read each file
    by its path when its turn came; a file copied again in that moment went out unstamped,
    and a PACS that keeps the first copy of an instance (Orthanc) kept it under the wrong
    identity. Now storescu reads the file opened before it started: the PACS gets the
    stamped version, and the new copy waits for its own quiet period, then goes stamped."""
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    second = pydicom.dcmread(sources / "IM00002.dcm").SOPInstanceUID
    with ReplacingPACS(target / "IM00002.dcm", sources / "IM00002.dcm") as pacs:
        site.use(pacs)
        site.env |= {"RECONCILE": "off", "ASSOCIATIONS": "1"}
        first = site.run()
        assert first.returncode == 1, first.stdout  # the new copy is still settling
        assert {uid: ds.PatientID for uid, ds in pacs.accepted.items()} == {
            pydicom.dcmread(sources / "IM00001.dcm").SOPInstanceUID: "4242", second: "4242"}
        assert [Path(k).name for k in site.archived()] == ["IM00001.dcm"]
        assert pydicom.dcmread(target / "IM00002.dcm").PatientID != "4242"  # the new copy
        second_run = site.run()
        assert second_run.returncode == 0, second_run.stdout
        assert pacs.accepted[second].PatientID == "4242"
    archived = {Path(k).name: v for k, v in site.archived().items()}
    assert sorted(archived) == ["IM00001.dcm", "IM00002.dcm"]
    assert pydicom.dcmread(archived["IM00002.dcm"]).PatientID == "4242"


def test_a_file_replaced_before_storescu_opens_it_is_not_sent(
        site: Site, sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaced between stamping and the send: the new copy is not the version stamped, so
    it is not sent at all (neither unstamped nor counted); it goes at its next quiet period."""
    store_module = importlib.import_module("importer.dcmtk.store")  # (dcmtk.store: the function)
    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    second = pydicom.dcmread(sources / "IM00002.dcm").SOPInstanceUID
    real_pin = store_module._pin

    def replace_then_pin(paths: list[str], *args: Any) -> Any:
        if str(target / "IM00002.dcm") in paths:
            shutil.copy(sources / "IM00002.dcm", target / ".again")
            os.replace(target / ".again", target / "IM00002.dcm")
        return real_pin(paths, *args)

    with RefusingSCP(aet="STORESCP") as pacs:
        site.use(pacs)
        site.env |= {"RECONCILE": "off"}
        monkeypatch.setattr(store_module, "_pin", replace_then_pin)
        report = pipeline.run_batch(load_settings({}, site.env))
        monkeypatch.undo()
        assert report.exit_code == 1
        assert second not in pacs.accepted
        assert [Path(k).name for k in site.archived()] == ["IM00001.dcm"]
        assert site.run().returncode == 0
        assert pacs.accepted[second].PatientID == "4242"


def test_replaced_after_send_is_sent_again_not_archived_stale(
        site: Site, storescp: StoreSCP, sources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten after it was sent, with the same size and its old mtime put back
    (as `cp -p` of a same-size file does): it is not archived; the next run sends the new
    version (the journal tells versions apart by ctime) and the receipt says an earlier
    version had been sent. Signal: the identity re-check before archiving."""
    site.use(storescp)
    target = site.import_dir / FOLDER
    target.mkdir()
    shutil.copy(sources / "IM00001.dcm", target / "IM00001.dcm")
    real_finish = pipeline.finish

    def rewrite_then_finish(folder: pipeline.Folder, *args: object) -> None:
        path = target / "IM00001.dcm"
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # one pixel changes
        replacement = target / ".new"
        replacement.write_bytes(bytes(data))
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(replacement, path)
        real_finish(folder, *args)

    monkeypatch.setattr(pipeline, "finish", rewrite_then_finish)
    assert pipeline.run_batch(load_settings({}, site.env)).exit_code == 1
    monkeypatch.undo()
    assert site.archived() == {} and len(storescp.received()) == 1

    assert site.run().returncode == 0
    storescp.stop()
    archived = site.archived()[f"{FOLDER}/IM00001.dcm"]
    receipt = (archived.parent.parent / f"{FOLDER}.receipt.json").read_text()
    assert '"earlier_versions_sent": 1' in receipt
    last = max(storescp.received(), key=lambda p: p.stat().st_mtime_ns)
    assert pydicom.dcmread(last).PixelData == pydicom.dcmread(archived).PixelData


# --- watch -----------------------------------------------------------------------------------


@pytest.fixture
def watching(site: Site, storescp: StoreSCP) -> Iterator[Watching]:
    site.use(storescp)
    site.env |= {"SETTLE_SECONDS": "1", "INCOMPLETE_GRACE": "3600"}
    watcher = Watching(site)
    yield watcher
    if watcher.process.poll() is None:
        watcher.stop()


def test_watch_header_then_stall_longer_than_delay(watching: Watching, site: Site,
                                                   storescp: StoreSCP, sources: Path) -> None:
    """The reported loss: a writer writes the header, stalls past DELAY holding the file,
    then writes the pixel data. Nothing of that file is sent, moved or quarantined while it
    stalls, and the folder's finished files wait with it (the rest of the copy may be
    another patient's CD: chaos seed 35); the folder goes whole once the file is done."""
    target = site.import_dir / FOLDER
    target.mkdir()
    src = sources / "IM00004.dcm"
    writer = Writer(src, target / "IM00004.dcm", pixel_offset(src))
    for name in ("IM00001.dcm", "IM00002.dcm", "IM00003.dcm"):
        shutil.copy(sources / name, target / name)
    wait_for(lambda: "waits for the rest of its folder" in receive_log(site), 30)
    time.sleep(3)  # past DELAY again: the folder is looked at again, and left again
    assert len(site.remaining()) == 4 and site.failed() == {} and site.archived() == {}
    assert storescp.received() == []
    writer.release()
    wait_for(lambda: site.remaining() == [], 30)
    watching.stop()
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {f"IM0000{i}.dcm" for i in range(1, 5)})
    assert watching.output.count("IM00004.dcm: still being written or incomplete") == 1


def test_watch_writer_closes_after_the_header_and_comes_back(
        watching: Watching, site: Site, storescp: StoreSCP, sources: Path) -> None:
    """A writer that closes the file after the header and reopens it later to append (no
    lease can see it while it is closed): the image without pixel data waits as incomplete,
    and is sent whole once the rest arrives."""
    target = site.import_dir / FOLDER
    target.mkdir()
    src = sources / "IM00001.dcm"
    writer = Writer(src, target / "IM00001.dcm", pixel_offset(src), close_between=True)
    time.sleep(5)  # DELAY (2 s) and SETTLE_SECONDS (1 s) have passed
    assert storescp.received() == [] and site.failed() == {} and site.archived() == {}
    writer.release()
    wait_for(lambda: site.remaining() == [], 30)
    watching.stop()
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {"IM00001.dcm"})
    assert "an image without its pixel data yet" in watching.output


def test_watch_writer_holding_a_complete_file_open(watching: Watching, site: Site,
                                                   storescp: StoreSCP, sources: Path) -> None:
    """All bytes written but the writer still holds the file open (it may write more, or
    truncate): not taken until it closes it."""
    target = site.import_dir / FOLDER
    target.mkdir()
    src = sources / "IM00001.dcm"
    writer = Writer(src, target / "IM00001.dcm", src.stat().st_size)
    time.sleep(5)
    assert storescp.received() == [] and site.archived() == {}
    writer.release()
    wait_for(lambda: site.remaining() == [], 30)
    watching.stop()
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {"IM00001.dcm"})


def test_watch_parallel_slow_writes_do_not_hold_back_another_folder(
        watching: Watching, site: Site, storescp: StoreSCP, sources: Path,
        tmp_path: Path) -> None:
    """Four files written in parallel into one folder, slowly and without a pause long
    enough to look quiet (MODIFY events keep its timer running), while another folder goes
    quiet and is sent. Then the first folder's files arrive whole."""
    slow = site.import_dir / "#5-Slow^Upload"
    slow.mkdir()
    script = ("import sys, time\n"
               "data = open(sys.argv[1], 'rb').read()\n"
               "with open(sys.argv[2], 'wb') as fh:\n"
               "    for i in range(0, len(data), 4096):\n"
               "        fh.write(data[i:i + 4096]); fh.flush(); time.sleep(0.3)\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(sources / f"IM0000{i}.dcm"),
                                 str(slow / f"IM0000{i}.dcm")]) for i in range(1, 5)]
    time.sleep(0.5)
    quick = tmp_path / "quick"
    make_patient_folder(quick, "#6-Quick^Folder", 3)
    shutil.move(str(quick / "#6-Quick^Folder"), site.import_dir)
    wait_for(lambda: len(site.archived()) == 3, 20)
    assert all(w.poll() is None for w in writers), "the slow copy ended too soon to test"
    assert not any("Slow" in k for k in site.archived())
    for w in writers:
        assert w.wait(timeout=60) == 0
    wait_for(lambda: site.remaining() == [], 30)
    watching.stop()
    storescp.stop()
    received = storescp.received_datasets()
    assert len(received) == 7 and all(whole(ds) for ds in received)
    assert site.failed() == {}
    for i in range(1, 5):
        archived = site.archived()[f"#5-Slow^Upload/IM0000{i}.dcm"]
        assert pydicom.dcmread(archived).PixelData == pydicom.dcmread(
            sources / f"IM0000{i}.dcm").PixelData


# --- the signals themselves -----------------------------------------------------------------


def test_proc_fallback_sees_a_writer_where_no_lease_can_be_taken() -> None:
    """As a user who does not own the file and lacks CAP_LEASE, the lease cannot tell;
    /proc/*/fdinfo still names the writer (same PID namespace)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two other users")
    shared = Path(tempfile.mkdtemp(prefix="share-test-", dir="/tmp"))  # pytest's is 0700
    shared.chmod(0o777)
    path = shared / "shared.dcm"
    path.write_bytes(b"x" * 1000)
    path.chmod(0o666)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    writer = subprocess.Popen([*nobody, sys.executable, "-c",
                               f"import time; f = open({str(path)!r}, 'r+b'); time.sleep(30)"])
    try:
        wait_for(lambda: any(os.path.realpath(f"/proc/{writer.pid}/fd/{fd}") == str(path)
                             for fd in os.listdir(f"/proc/{writer.pid}/fd")), 10)
        check = ("import sys; sys.path.insert(0, sys.argv[2]); from importer import share;"
                 " p = sys.argv[1];"
                 " print(share.open_for_writing(p));"
                 " print(share.SettleCheck(0).why_unsettled(p, share.identity(p)))")
        seen = subprocess.run([*nobody, sys.executable, "-c", check, str(path),
                               str(Path(__file__).parent.parent)],
                              capture_output=True, text=True, timeout=30)
        assert seen.returncode == 0, seen.stderr
        lease, verdict = seen.stdout.splitlines()
        assert lease == "None"  # EACCES: not the owner, no CAP_LEASE
        assert verdict.startswith(f"open for writing by pid {writer.pid}")
        writer.kill()
        writer.wait()
        assert share.open_for_writing(str(path)) is False
    finally:
        writer.kill()
        writer.wait()
        shutil.rmtree(shared)


# --- what a PACS already got from a partial file ---------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
def test_complete_file_sent_again_over_a_partial_instance(
        site: Site, tmp_path: Path, sources: Path, overwrite: bool) -> None:
    """An earlier importer sent the header of a file still being written (no pixel data).
    The complete file goes again under the same SOP Instance UID. Orthanc replaces the
    instance only with OverwriteInstances: true; by default it answers Success and keeps the
    partial one (measured; the README tells PACS administrators)."""
    from simsite.receivers import Orthanc

    src = sources / "IM00001.dcm"
    partial = tmp_path / "partial.dcm"
    partial.write_bytes(src.read_bytes()[:pixel_offset(src)])
    subprocess.run(["dcmodify", "-nb", "-i", "(0010,0020)=4242", "-i",  # as stamped then
                    "(0010,0010)=Stall^Test", str(partial)], check=True, capture_output=True)
    with Orthanc(config={"OverwriteInstances": overwrite}) as orthanc:
        sent = subprocess.run(["storescu", "-aec", orthanc.aet, orthanc.host, str(orthanc.port),
                               str(partial)], capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr
        site.env |= {"PACS_SERVER_IP": orthanc.host, "PACS_SERVER_PORT": str(orthanc.port),
                     "PACS_AET": orthanc.aet}
        (site.import_dir / FOLDER).mkdir()
        shutil.copy(src, site.import_dir / FOLDER / "IM00001.dcm")
        result = site.run()
        assert result.returncode == 0, result.stderr
        (instance,) = orthanc.instances()
        tags = orthanc.get(f"/instances/{instance['ID']}/tags?short")
        assert ("7fe0,0010" in tags) is overwrite
        assert tags["0010,0020"] == "4242"
        assert site.archived()  # acknowledged and listed by C-FIND either way


def test_a_file_replaced_after_a_crash_mid_stamp_is_not_overwritten_by_its_backup(
        site: Site, sources: Path) -> None:
    """Found by the fault campaign (chaos seed 121): `watch` killed just after dcmodify
    (stamped files, originals as .bak), then a file copied again before the restart: the
    recovery put every .bak back, the older original over the newer copy, which was lost.
    Now a .bak goes back only over what dcmodify wrote; a newer copy stays."""
    from importer import intent
    from importer.folders import Patient

    target = site.import_dir / FOLDER
    target.mkdir()
    for name in ("IM00001.dcm", "IM00002.dcm"):
        shutil.copy(sources / name, target / name)
    paths = [str(target / "IM00001.dcm"), str(target / "IM00002.dcm")]
    settings = load_settings({}, site.env)
    intent.write_intent(intent.intent_path(settings, FOLDER), paths)
    provenance = ("-i", "(0400,0561)[0].(0400,0550)[0].(0010,0020)=OLD")
    dcmtk.stamp_identity(paths, Patient("4242", "Stall^Test"), utf8=False, backup=True,
                         provenance=provenance)  # then the crash: both .bak are there
    assert os.path.exists(paths[0] + ".bak") and os.path.exists(paths[1] + ".bak")
    shutil.copy(sources / "IM00003.dcm", target / ".again")
    os.replace(target / ".again", paths[1])  # copied again before the restart

    assert intent.recover_interrupted_stamp(settings, FOLDER) == 1
    assert (target / "IM00001.dcm").read_bytes() == (sources / "IM00001.dcm").read_bytes()
    assert (target / "IM00002.dcm").read_bytes() == (sources / "IM00003.dcm").read_bytes()
    assert not os.path.exists(paths[0] + ".bak") and not os.path.exists(paths[1] + ".bak")


def test_a_decompressed_copy_left_by_a_killed_send_is_removed_by_the_next_run(
        site: Site, storescp: StoreSCP) -> None:
    """Found by the fault campaign (chaos seed 219): run-once killed while it sent a
    decompressed copy left that copy of a patient's image in the share's work dir for ever.
    The next run removes such leftovers, never one another importer holds."""
    import fcntl

    from importer.scratch import LOCK
    from importer.stamp import WORK_DIR_NAME

    work = site.import_dir / WORK_DIR_NAME
    stale, busy = work / "decompress-killed", work / "decompress-busy"
    for d in (stale, busy):
        d.mkdir(parents=True)
        (d / "0.dcm").write_bytes(b"a patient's image")
        (d / LOCK).touch()
    site.use(storescp)
    make_patient_folder(site.import_dir, "#77-Jpeg^Less", 1, rows=16)
    with open(busy / LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another importer, sending right now
        assert site.run().returncode == 0
    assert not stale.exists()
    assert (busy / "0.dcm").exists()
