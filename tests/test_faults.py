"""Fault injection (issue 5): real DCMTK storescu, driven by the real `importer run-once`, against
receivers that misbehave on purpose.

What is proven here, whatever the fault: no file is lost (each original instance is either in
the import dir or archived, never both, never neither), no file is archived unless every
required PACS acknowledged it, and no file is left half-written or half-moved.

Faults: DCMTK ``storescp`` switches (``--refuse``, ``--abort-after``, ``--abort-during``,
``--sleep-during`` against ``DIMSE_TIMEOUT``); per-instance C-STORE statuses from a pynetdicom
receiver (:mod:`simsite.refusing_scp`; Orthanc cannot do it, see there); a required backup and an
optional destination that are down; SIGKILL at random moments, and at exact system calls of the
archive, receipt and quarantine steps (strace ``inject``); two importers at once; a full and a
read-only archive file system and a full FAILED_DIR (tmpfs; root only).

Bugs this suite found were fixed; a regression shows as a plain failure. With
``FAULT_REPORT=1`` the kill loop prints where each kill landed and how many files it made the
importer send twice (``FAULT_SEED``, ``FAULT_KILL_ITERATIONS`` vary it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from simsite.dicomgen import _pixels, make_ct, make_patient_folder, truncated_copy
from simsite.receivers import StoreSCP, free_port
from simsite.refusing_scp import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    RefusingSCP,
)
from simsite.site import IMPORTER, Site

ROWS = 16  # small files: these tests are about control flow, not bytes


@pytest.fixture(autouse=True, scope="module")
def dcmtk_storescu() -> None:
    """pynetdicom installs its own `storescu`/`storescp`/`findscu` scripts into the venv's bin;
    the importer must run DCMTK's (its output is what it parses)."""
    found = shutil.which("storescu")
    assert found, "DCMTK storescu is not on PATH"
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    assert "dcmtk" in version.lower(), f"{found} is not DCMTK's storescu (pynetdicom's?)"


def uids_of(paths: list[Path]) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}


def read_whole(path: Path) -> pydicom.Dataset:
    """Parse a file completely (pixels included): a half-written file fails here."""
    ds = pydicom.dcmread(path)
    assert ds.PixelData == _pixels(int(ds.Rows)), f"{path}: pixel data damaged"
    return ds


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


RECEIPT_PARTIAL = ".receipt.json.partial"


def no_temporaries(*roots: Path, receipts: bool = True) -> None:
    """No `.partial` copy and no `.importer-*` swap file left anywhere (receipts=False: a
    receipt's `.partial` is tolerated; test_sigkill_while_writing_a_receipt is about that)."""
    for root in roots:
        for path in files_under(root):
            if not receipts and path.name.endswith(RECEIPT_PARTIAL):
                continue
            assert not path.name.endswith(".partial"), f"half-moved: {path}"
            assert not path.name.startswith(".importer-"), f"half-swapped: {path}"


def archived_files(archive: Path) -> list[Path]:
    """Files under ARCHIVE_DIR/<ts>/<folder>/ (not the receipts beside the folders)."""
    return [p for p in files_under(archive) if len(p.relative_to(archive).parts) >= 3]


def archived_in(archive: Path) -> dict[str, Path]:
    """Like Site.archived() for an ARCHIVE_DIR elsewhere: '<folder>/<rel>' -> archived file."""
    return {str(Path(*p.relative_to(archive).parts[1:])): p for p in archived_files(archive)}


def run_importer_until(site: Site, needle: str, timeout: float = 30) -> subprocess.Popen[str]:
    """Start `importer run-once` and return once its JSON log contains needle."""
    process = subprocess.Popen([IMPORTER, "run-once"], env=site.env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    log = site.log_dir / "log.log"
    while needle not in (log.read_text(encoding="utf-8") if log.exists() else ""):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{needle!r} never logged"
        time.sleep(0.02)
    return process


# --- 1. storescp switches --------------------------------------------------------------------


@pytest.mark.parametrize(("switch", "reason"), [
    (["--refuse"], "Association Rejected"),
    (["--abort-after"], "Peer aborted Association"),
    (["--abort-during"], "Peer aborted Association"),
    (["--sleep-during", "2"], "DIMSE No data available (timeout"),
], ids=["refuse", "abort-after", "abort-during", "sleep-during-vs-DIMSE_TIMEOUT"])
def test_receiver_fault_leaves_every_file_for_retry(site: Site, tmp_path: Path,
                                                    switch: list[str], reason: str) -> None:
    """storescp 3.6.7 as a failing PACS: the association is rejected (`--refuse`), aborted
    after or during the first C-STORE-RQ before any response (`--abort-after`,
    `--abort-during`; with small files storescu prints the same for both: `Store Failed` +
    `0006:0317 Peer aborted Association`, the other files `DIMSE Failed to send message`), or
    the answer comes later than the importer's DIMSE_TIMEOUT (`--sleep-during 2` vs 1 s:
    `0006:0207 DIMSE No data available (timeout in non-blocking mode)`). Each is transient:
    exit 1, nothing archived or quarantined, every file still in the import dir, complete;
    then a working PACS gets them all and they are archived."""
    site.env["DIMSE_TIMEOUT"] = "1"
    uids = uids_of(make_patient_folder(site.import_dir, "#31-Fault^Switch", 2, rows=ROWS))

    with StoreSCP(tmp_path / "faulty", extra_args=switch) as faulty:
        site.use(faulty)
        result = site.run()
        if switch[0] != "--sleep-during":  # a slow PACS does store what it answers too late
            assert faulty.received() == []

    assert result.returncode == 1, result.stderr
    assert reason in result.stderr
    waiting = re.findall(r"(?: and (\d+) more files)?: left for retry: not yet at", result.stderr)
    assert sum(1 + int(more or 0) for more in waiting) == 2  # one line per reason
    assert f"{faulty.aet}@127.0.0.1:{faulty.port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert site.archived() == {} and site.failed() == {}
    left = [site.import_dir / rel for rel in site.remaining()]
    assert {read_whole(p).SOPInstanceUID for p in left} == set(uids)
    no_temporaries(site.import_dir, site.archive_dir)

    with StoreSCP(tmp_path / "working") as working:
        site.use(working)
        retry = site.run()
        received = {ds.SOPInstanceUID: ds for ds in working.received_datasets()}
    assert retry.returncode == 0, retry.stderr
    assert set(received) == set(uids)
    assert {ds.PatientID for ds in received.values()} == {"31"}
    assert len(site.archived()) == 2 and site.remaining() == []


def test_storescp_reject_switch_does_not_reject_storescu(site: Site, tmp_path: Path) -> None:
    """`storescp --reject` only rejects associations *without an Implementation Class UID*;
    storescu always sends one, so it is no fault for DCMTK senders (use `--refuse`)."""
    uid = make_ct(site.import_dir / "#32-Reject^Switch" / "a.dcm", rows=ROWS)
    with StoreSCP(tmp_path / "received", extra_args=["--reject"]) as receiver:
        site.use(receiver)
        result = site.run()
        assert [ds.SOPInstanceUID for ds in receiver.received_datasets()] == [uid]
    assert result.returncode == 0, result.stderr


def test_hung_pacs_costs_a_few_timeouts_not_one_per_file(site: Site, tmp_path: Path) -> None:
    """With the default DIMSE_TIMEOUT (120 s), 100 files to a hung PACS keep one run-once
    (and, in `watch`, every other folder) waiting 3 h 20 min, plus up to ACSE_TIMEOUT for the
    release. Measured: 20 files, storescp `--sleep-during 3`, DIMSE_TIMEOUT=1: 27 s, every file
    `Store Failed … DIMSE No data available`, the release waiting for the PACS's late answers.
    Once one store timed out, the rest of that association should be given up (transient)."""
    site.env["DIMSE_TIMEOUT"] = "1"
    make_patient_folder(site.import_dir, "#33-Hung^Pacs", 12, rows=ROWS)
    with StoreSCP(tmp_path / "hung", extra_args=["--sleep-during", "30"]) as hung:
        site.use(hung)
        process = subprocess.Popen([IMPORTER, "run-once"], env=site.env, text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        started = time.monotonic()
        try:
            _out, err = process.communicate(timeout=6)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"12 files, DIMSE_TIMEOUT=1: still running after "
                        f"{time.monotonic() - started:.0f} s")
    assert process.returncode == 1, err
    assert len(site.remaining()) == 12 and site.archived() == {}


# --- 2. per-file refusals ----------------------------------------------------------------------


def test_refused_file_is_retried_then_quarantined_and_the_rest_archived(site: Site) -> None:
    """A PACS refusing single files (0xC000 cannot understand, 0xA900 data set does not match
    the SOP class) is permanent: the rest of the folder is archived at once; the refused files
    stay for retry on runs 1..MAX_ATTEMPTS-1, then go to FAILED_DIR/<ts>/<folder>/<rel> with a
    `<file>.reason.txt` naming the PACS and DCMTK's status text. Nothing is sent twice that
    the PACS already has."""
    site.env["MAX_ATTEMPTS"] = "2"
    folder = "#34-Refused^File"
    paths = make_patient_folder(site.import_dir, folder, 6, rows=ROWS)  # InstanceNumber 1..6
    uids = uids_of(paths)
    with RefusingSCP(statuses={2: CANNOT_UNDERSTAND, 4: DATASET_DOES_NOT_MATCH}) as pacs:
        site.use(pacs)

        first = site.run()
        assert first.returncode == 1, first.stderr
        assert set(site.archived()) == {f"{folder}/IM0000{n}.dcm" for n in (1, 3, 5, 6)}
        assert site.remaining() == [f"{folder}/IM00002.dcm", f"{folder}/IM00004.dcm"]
        assert site.failed() == {}
        assert f"IM00002.dcm: left for retry: not yet at {pacs.label}: Error: CannotUnderstand" \
            in first.stderr
        assert "Error: DataSetDoesNotMatchSOPClass" in first.stderr

        second = site.run()
        assert second.returncode == 1, second.stderr
        assert site.remaining() == []
        failed = site.failed()
        assert set(failed) == {f"{folder}/IM00002.dcm", f"{folder}/IM00004.dcm"}
        for name, text in (("IM00002.dcm", "Error: CannotUnderstand"),
                           ("IM00004.dcm", "Error: DataSetDoesNotMatchSOPClass")):
            quarantined = failed[f"{folder}/{name}"]
            assert quarantined.parent.parent.parent == site.failed_dir  # FAILED_DIR/<ts>/<folder>
            reason = quarantined.with_name(name + ".reason.txt").read_text(encoding="utf-8")
            assert f"{folder}/{name}" in reason
            assert f"refused by {pacs.label} 2 times: {text}" in reason
            assert read_whole(quarantined).PatientID == "34"
            assert f"{folder}/{name} quarantined in" in second.stderr

        third = site.run()
        assert third.returncode == 0, third.stderr

        per_uid = collections.Counter(r.uid for r in pacs.requests)
        archived_uids = {read_whole(p).SOPInstanceUID for p in site.archived().values()}
        assert pacs.accepted_uids() == archived_uids
        assert archived_uids | {read_whole(p).SOPInstanceUID for p in failed.values()} == set(uids)
        assert all(per_uid[uid] == 1 for uid in archived_uids), "resent a delivered file"
        assert all(per_uid[uid] == 2 for uid in set(uids) - archived_uids), "MAX_ATTEMPTS=2"


def test_out_of_resources_is_transient_and_never_quarantined(site: Site) -> None:
    """0xA700 (out of resources) refuses the file now, not forever: it stays for retry past
    MAX_ATTEMPTS and is delivered and archived once the PACS takes it."""
    site.env["MAX_ATTEMPTS"] = "2"
    folder = "#35-Out^OfResources"
    uids = uids_of(make_patient_folder(site.import_dir, folder, 3, rows=ROWS))
    with RefusingSCP(first_times={2: (OUT_OF_RESOURCES, 3)}) as pacs:
        site.use(pacs)
        for attempt in range(3):
            busy = site.run()
            assert busy.returncode == 1, (attempt, busy.stderr)
            assert site.remaining() == [f"{folder}/IM00002.dcm"], attempt
            assert site.failed() == {}, f"quarantined after {attempt + 1} transient refusals"
            assert "Refused: OutOfResources" in busy.stderr
        done = site.run()
        assert done.returncode == 0, done.stderr
        assert pacs.accepted_uids() == set(uids)
        assert len(pacs.answered(OUT_OF_RESOURCES)) == 3
        assert len(pacs.requests) == 3 + 3  # the two others were sent once
    assert len(site.archived()) == 3 and site.remaining() == [] and site.failed() == {}


def test_warning_statuses_b0xx_count_as_delivered(site: Site) -> None:
    """0xB000 / 0xB007 / 0xB006 (stored with coercion, mismatch, discarded elements): the PACS
    has the file, so it is archived and not sent again."""
    uids = uids_of(make_patient_folder(site.import_dir, "#36-Warning^Status", 3, rows=ROWS))
    with RefusingSCP(statuses={1: 0xB000, 2: 0xB007, 3: 0xB006}) as pacs:
        site.use(pacs)
        result = site.run()
        assert result.returncode == 0, result.stderr
        assert len(pacs.requests) == 3 and pacs.accepted_uids() == set(uids)
    assert len(site.archived()) == 3


def test_general_warning_statuses_count_as_delivered(site: Site) -> None:
    """PS3.7 C.4 warnings 0x0001, 0x0107 (attribute list error), 0x0116 (value out of range):
    the PACS stored the file; importer.dcmtk.classify_status means to treat them as delivered.
    Today they are 'left for retry', resent, and quarantined after MAX_ATTEMPTS although the
    PACS has them (reproduce by hand: `storescu -v` against this receiver prints
    `Received Store Response (Unknown Status: 0x107)`)."""
    uids = uids_of(make_patient_folder(site.import_dir, "#37-General^Warning", 3, rows=ROWS))
    with RefusingSCP(statuses={1: 0x0001, 2: 0x0107, 3: 0x0116}) as pacs:
        site.use(pacs)
        result = site.run()
        assert pacs.accepted_uids() == set(uids)  # the PACS kept all three
        assert result.returncode == 0, result.stderr
        assert len(pacs.requests) == 3
    assert len(site.archived()) == 3 and site.failed() == {}


# --- 3. required backup down, optional destination down ----------------------------------------


def test_optional_destination_down_never_holds_files_back(site: Site, tmp_path: Path) -> None:
    """Primary up, required backup down, an optional TOML destination down: nothing is
    archived (the backup lacks everything) and the optional one is named in a warning. Backup
    up: only the backup receives (the primary gets no second copy) and everything is archived
    although the optional destination still has nothing."""
    dead = free_port()
    config = tmp_path / "importer.toml"
    config.write_text(f'[[destination]]\nname = "research"\nhost = "127.0.0.1"\nport = {dead}\n'
                      'aet = "RESEARCH"\nrequired = false\n', encoding="utf-8")
    site.env["IMPORTER_CONFIG"] = str(config)
    optional = f"optional destination RESEARCH@127.0.0.1:{dead}"
    uids = uids_of(make_patient_folder(site.import_dir, "#38-Optional^Down", 4, rows=ROWS))
    backup = StoreSCP(tmp_path / "backup", aet="BACKUP", extra_args=["+uf"])
    with StoreSCP(tmp_path / "primary", extra_args=["+uf"]) as primary:
        site.use(primary)
        site.use(backup, "BACKUP_PACS")

        first = site.run()
        assert first.returncode == 1, first.stderr
        assert site.archived() == {} and len(site.remaining()) == 4
        assert f"4 files did not reach {optional}" in first.stderr
        assert f"not yet at BACKUP@127.0.0.1:{backup.port}" in first.stderr
        assert {ds.SOPInstanceUID for ds in primary.received_datasets()} == set(uids)

        with backup:
            second = site.run()
            assert second.returncode == 0, second.stderr
            assert sorted(ds.SOPInstanceUID for ds in backup.received_datasets()) == sorted(uids)
        assert len(primary.received()) == 4, "the primary already had them: no resend"
        assert f"4 files did not reach {optional}" in second.stderr
    assert len(site.archived()) == 4 and site.remaining() == []


# --- 4. SIGKILL at random moments --------------------------------------------------------------

KILL_ITERATIONS = int(os.environ.get("FAULT_KILL_ITERATIONS", "20"))
KILL_SEED = int(os.environ.get("FAULT_SEED", "5"))
KILL_FILES = 30


def _live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _log_size(site: Site) -> int:
    log = site.log_dir / "log.log"
    return log.stat().st_size if log.exists() else 0


def _last_logged(site: Site, offset: int) -> str:
    """The last complete JSON record logged after offset: where the kill landed."""
    with open(site.log_dir / "log.log", "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            return str(record.get("tool") or record.get("message", ""))[:40]
    return "(nothing logged)"


class UidCache:
    """SOP Instance UIDs of received files, parsed once per file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uids: dict[Path, str] = {}

    def all(self) -> list[str]:
        for path in files_under(self.root):
            if path not in self.uids:
                self.uids[path] = read_whole(path).SOPInstanceUID
        return list(self.uids.values())


def check_no_loss(site: Site, folder: str, patient_id: str, originals: set[str],
                  received: set[str], *, after_crash: bool) -> tuple[set[str], set[str]]:
    """Every original instance is in the import dir or archived, never both, never neither;
    every file parses completely; nothing archived unsent; nothing quarantined.

    after_crash: dcmodify's backup mode may have left `<file>.bak` (the original, complete)
    beside a half-written `<file>`; the next run puts the `.bak` back, so it stands for the
    file. Once a run has completed no `.bak` may be left.
    """
    present = files_under(site.import_dir / folder)
    backups = {p for p in present if p.name.endswith(".bak")}
    assert after_crash or not backups, f"backups left after a complete run: {backups}"
    effective = [p for p in present
                 if p in backups or p.with_name(p.name + ".bak") not in backups]
    in_import = [read_whole(p) for p in effective]
    backup_names = {str(p) for p in backups}
    assert {ds.PatientID for ds in in_import if ds.filename in backup_names} <= {"OLD1"}
    archived = [read_whole(p) for p in archived_files(site.archive_dir)
                if p.relative_to(site.archive_dir).parts[1] == folder]
    import_uids = [ds.SOPInstanceUID for ds in in_import]
    archive_uids = [ds.SOPInstanceUID for ds in archived]
    assert len(import_uids) == len(set(import_uids)), "an instance twice in the import dir"
    assert len(archive_uids) == len(set(archive_uids)), "an instance archived twice"
    assert not set(import_uids) & set(archive_uids), "both in the import dir and archived"
    assert set(import_uids) | set(archive_uids) == originals, "an instance was lost"
    assert {ds.PatientID for ds in in_import} <= {"OLD1", patient_id}
    assert {ds.PatientID for ds in archived} <= {patient_id}
    assert not any(ds.filename.endswith(".bak") for ds in archived), "a backup was archived"
    assert set(archive_uids) <= received, "archived but the PACS never got it"
    assert files_under(site.failed_dir) == []
    no_temporaries(site.import_dir, site.archive_dir, receipts=False)
    return set(import_uids), set(archive_uids)


def test_sigkill_at_random_moments_loses_nothing_and_archives_each_file_once(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KILL_ITERATIONS times: a new folder of 30 files, `importer run-once` (primary and backup
    PACS, both required) SIGKILLed after a random delay within one run's duration (even
    iterations: its whole process group, as `docker kill` does; odd ones: only the Python
    process, as the OOM killer does, so its DCMTK children are orphaned), the state checked,
    then a run to completion and the state checked again: nothing lost, nothing archived that
    either PACS lacks, nothing half-written, every file archived once. Duplicate sends (a
    receiver's count minus unique instances; storescp `+uf` writes one file per C-STORE) come
    from a kill after the PACS answered but before the journal recorded the answer.
    FAULT_REPORT=1 prints where each kill landed and what it cost."""
    rng = random.Random(KILL_SEED)
    report = []
    with StoreSCP(tmp_path / "primary", extra_args=["+uf"]) as primary, \
            StoreSCP(tmp_path / "backup", aet="BACKUP", extra_args=["+uf"]) as backup:
        site.use(primary)
        site.use(backup, "BACKUP_PACS")
        receivers = (UidCache(primary.out_dir), UidCache(backup.out_dir))

        def both() -> set[str]:
            return set(receivers[0].all()) & set(receivers[1].all())

        def sends() -> int:
            return sum(len(r.all()) for r in receivers)

        durations = []  # one undisturbed run: the kills fall anywhere inside it
        for k in range(2):
            make_patient_folder(site.import_dir, f"#{98 + k}-Kill^Calibrate", KILL_FILES,
                                rows=ROWS)
            started = time.monotonic()
            assert site.run().returncode == 0
            durations.append(time.monotonic() - started)
        window = min(durations)
        all_uids = both()

        for i in range(KILL_ITERATIONS):
            folder, patient_id = f"#{101 + i}-Kill^Loop", str(101 + i)
            originals = set(uids_of(make_patient_folder(site.import_dir, folder, KILL_FILES,
                                                        rows=ROWS)))
            all_uids |= originals
            before, log_offset = sends(), _log_size(site)
            delay = rng.uniform(0, window)
            process = subprocess.Popen([IMPORTER, "run-once"], env=site.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            time.sleep(delay)
            finished_first = process.poll() is not None
            with contextlib.suppress(ProcessLookupError):
                if i % 2 == 0:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            process.wait()
            deadline = time.monotonic() + 20
            while _live_group_members(process.pid):  # orphaned DCMTK tools end on their own
                assert time.monotonic() < deadline, "orphaned DCMTK processes keep running"
                time.sleep(0.02)
            where = "finished" if finished_first else _last_logged(site, log_offset)
            backups = sum(p.name.endswith(".bak") for p in files_under(site.import_dir))
            receipt_partials = sum(p.name.endswith(RECEIPT_PARTIAL)
                                   for p in files_under(site.archive_dir))

            left, _ = check_no_loss(site, folder, patient_id, originals, both(),
                                    after_crash=True)
            done = site.run()
            assert done.returncode == 0, (i, where, done.stderr)
            assert "Traceback" not in done.stderr
            left_after, _ = check_no_loss(site, folder, patient_id, originals, both(),
                                          after_crash=False)
            assert left_after == set(), (i, where)
            assert files_under(site.import_dir) == [], f"{i}: stray files after completion"
            report.append((i, "group" if i % 2 == 0 else "python", delay, where, len(left),
                           backups, receipt_partials, sends() - before - 2 * KILL_FILES))

        got = [r.all() for r in receivers]
    archived = collections.Counter(read_whole(p).SOPInstanceUID
                                   for p in archived_files(site.archive_dir))
    assert set(archived) == all_uids and max(archived.values()) == 1
    assert set(got[0]) == all_uids and set(got[1]) == all_uids
    duplicates = [len(g) - len(set(g)) for g in got]
    if os.environ.get("FAULT_REPORT"):
        with capsys.disabled():
            print(f"\nkill -9 loop (seed {KILL_SEED}, window {window:.2f} s):"
                  f" {KILL_ITERATIONS} kills, {len(all_uids)} files, 0 lost, 0 archived unsent,"
                  f" duplicate sends: primary {duplicates[0]}, backup {duplicates[1]}")
            for row in report:
                print("  {:2d} kill {:6s} after {:.3f} s, last logged {:40.40s} left {:2d},"
                      " .bak {:2d}, receipt .partials so far {}, resent {:2d}".format(*row))


def run_killed_at(site: Site, syscall: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    """`importer run-once` under strace, SIGKILLed at its first `syscall` on one of paths."""
    argv = ["strace", "-f", "-qq", "-o", "/dev/null"]
    for path in paths:
        argv += ["-P", str(path)]
    argv += ["-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when=1",
             IMPORTER, "run-once"]
    return subprocess.run(argv, env=site.env, capture_output=True, text=True, errors="replace",
                          timeout=120, stdin=subprocess.DEVNULL, cwd=site.root)


def batch_dirs(root: Path, *parts: str) -> list[Path]:
    """root/<yyyymmdd_hhmmss>/*parts for every second from one before now to ten after."""
    now = time.time()
    return [root.joinpath(time.strftime("%Y%m%d_%H%M%S", time.localtime(now + k)), *parts)
            for k in range(-1, 11)]


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on another file system than tmp_path: /dev/shm, or a tmpfs we mount."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        path = Path(tempfile.mkdtemp(prefix="importer-archive-", dir=shm))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    elif _NO_MOUNT is None:
        with tmpfs(tmp_path / "other-fs", "64m") as path:
            yield path
    else:
        pytest.skip(f"no second file system: no writable /dev/shm and {_NO_MOUNT}")


def _can_strace() -> str | None:
    if shutil.which("strace") is None:
        return "strace is not installed (it kills the importer at exact system calls)"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"strace cannot trace here: {probe.stderr.strip()}"


_NO_STRACE = _can_strace()
needs_strace = pytest.mark.skipif(_NO_STRACE is not None, reason=_NO_STRACE or "")


@needs_strace
@pytest.mark.parametrize("kill_at", [
    pytest.param("unlink", id="after-copy-before-unlink"),
    pytest.param("fsync", id="during-copy"),
])
def test_sigkill_inside_a_cross_filesystem_archive_move(site: Site, storescp: StoreSCP,
                                                        other_filesystem: Path,
                                                        kill_at: str) -> None:
    """ARCHIVE_DIR on another file system: a move is copy to `.partial`, fsync, rename, unlink
    the source. SIGKILL exactly inside it (strace `inject=…:signal=KILL` on the source's unlink,
    or on the fsync of the `.partial`), then a normal run: the file must end up archived once,
    with no `.partial` left."""
    site.use(storescp)
    site.env["ARCHIVE_DIR"] = str(other_filesystem)
    folder = "#46-Cross^Filesystem"
    paths = make_patient_folder(site.import_dir, folder, 3, rows=ROWS)
    uids = uids_of(paths)
    if kill_at == "unlink":
        targets = [paths[0]]
    else:
        targets = batch_dirs(other_filesystem, folder, "IM00001.dcm.partial")

    killed = run_killed_at(site, kill_at, targets)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "[PHASE 3]" in killed.stderr  # it died inside the archive step
    time.sleep(1.1)  # a restart comes later: a new batch stamp (same second: same batch dir)
    again = site.run()

    assert again.returncode == 0, again.stderr
    assert site.remaining() == []
    archived = [read_whole(p).SOPInstanceUID for p in archived_files(other_filesystem)
                if not p.name.endswith(".partial")]
    assert sorted(archived) == sorted(uids), "each file archived exactly once"
    no_temporaries(other_filesystem)


@needs_strace
def test_sigkill_while_writing_a_receipt(site: Site, storescp: StoreSCP) -> None:
    """The receipt is written after the folder's files were moved. SIGKILL exactly before its
    `.partial` is renamed into place (strace, on that rename), then a normal run: every
    archived folder must have its receipt, and no `.partial` may be left. (The random kill
    loop hits this too, now and then.)"""
    site.use(storescp)
    folder = "#48-Receipt^Kill"
    make_patient_folder(site.import_dir, folder, 3, rows=ROWS)

    killed = run_killed_at(site, "rename", batch_dirs(site.archive_dir, folder + RECEIPT_PARTIAL))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    time.sleep(1.1)  # a restart comes later: a new batch stamp
    again = site.run()

    assert again.returncode == 0, again.stderr
    assert len(site.archived()) == 3 and site.remaining() == []
    no_temporaries(site.archive_dir)
    (receipt,) = site.archive_dir.glob(f"*/{folder}.receipt.json")
    assert len(json.loads(receipt.read_text())["files"]) == 3


@needs_strace
def test_sigkill_between_quarantine_and_its_reason(site: Site, storescp: StoreSCP) -> None:
    """An unreadable file is quarantined: its reason is written beside its target (a
    `.partial` renamed into place), then the file is moved. SIGKILL exactly inside that
    (strace, on renaming `<file>.reason.txt.partial`): the file must never end up in
    FAILED_DIR without its reason, and `importer status` must list it after the next run."""
    site.use(storescp)
    folder = "#47-Quarantine^Kill"
    make_ct(site.import_dir / folder / "whole.dcm", rows=ROWS)
    truncated_copy(site.import_dir / folder / "whole.dcm", site.import_dir / folder / "cut.dcm",
                   1000)
    (site.import_dir / folder / "whole.dcm").unlink()
    make_ct(site.import_dir / folder / "good.dcm", rows=ROWS)

    reasons = batch_dirs(site.failed_dir, folder, "cut.dcm.reason.txt.partial")
    killed = run_killed_at(site, "rename", reasons)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    site.run()

    quarantined = site.failed()
    assert set(quarantined) == {f"{folder}/cut.dcm"}
    reason = Path(str(quarantined[f"{folder}/cut.dcm"]) + ".reason.txt")
    assert reason.exists() and "DCMTK cannot read this file" in reason.read_text(), \
        "quarantined without its reason"
    status = json.loads(site.run("status", "--json").stdout)
    assert [q["file"].endswith(f"{folder}/cut.dcm") for q in status["quarantined"]] == [True]


# --- 5. two importers at once ------------------------------------------------------------------


def test_two_importers_at_once_deliver_and_archive_each_file_once(site: Site,
                                                                  tmp_path: Path) -> None:
    """Two `run-once` started together on one import dir with several folders, three rounds:
    each folder is processed by one of them (the other exits 3 for it), every file reaches the
    PACS once and is archived once, and neither prints a traceback or an error."""
    with StoreSCP(tmp_path / "received", extra_args=["+uf", "--fork"]) as receiver:
        site.use(receiver)
        expected: set[str] = set()
        codes = []
        for round_ in range(3):
            for k in range(5):
                expected |= set(uids_of(make_patient_folder(
                    site.import_dir, f"#{200 + 10 * round_ + k}-Two^Importers", 12, rows=ROWS)))
            processes = [subprocess.Popen([IMPORTER, "run-once"], env=site.env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL) for _ in range(2)]
            for process in processes:
                _out, err = process.communicate(timeout=60)
                codes.append(process.returncode)
                assert process.returncode in (0, 3), err
                assert "Traceback" not in err and "[ERROR]" not in err, err
            assert site.remaining() == [], round_
        got = [ds.SOPInstanceUID for ds in receiver.received_datasets()]
    assert sorted(got) == sorted(expected), "each file delivered exactly once"
    archived = collections.Counter(read_whole(p).SOPInstanceUID
                                   for p in archived_files(site.archive_dir))
    assert set(archived) == expected and max(archived.values()) == 1
    assert files_under(site.failed_dir) == []
    if os.environ.get("FAULT_REPORT"):
        print(f"\ntwo importers, exit codes per round: {codes}")


# --- 6. full and read-only archive file system -------------------------------------------------


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"importer-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            return f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    except FileNotFoundError:
        return "no mount command"
    finally:
        probe.rmdir()


_NO_MOUNT = _can_mount()
needs_mount = pytest.mark.skipif(_NO_MOUNT is not None, reason=_NO_MOUNT or "")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)])


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(mount: Path, leave_bytes: int) -> Path:
    """Fill the file system, then give back leave_bytes (rounded to pages by tmpfs)."""
    filler = mount / "filler"
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
                fh.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


@needs_mount
def test_archive_disk_full_keeps_the_sources_and_archives_once_space_is_back(
        site: Site, tmp_path: Path) -> None:
    """ARCHIVE_DIR on a full file system (another one than the import dir, so moves are
    copy + fsync + rename + unlink): the files that fit are archived, the rest stay complete in
    the import dir, no `.partial` is left, exit 1 with `No space left on device`; with space
    back the next run archives them, byte for byte, without sending them again."""
    folder = "#40-Disk^Full"
    with StoreSCP(tmp_path / "received", extra_args=["+uf"]) as receiver, \
            tmpfs(tmp_path / "archive-fs", "512k") as archive:
        site.use(receiver)
        site.env["ARCHIVE_DIR"] = str(archive)
        uids = uids_of(make_patient_folder(site.import_dir, folder, 6, rows=64))  # ~9 KB each
        filler = fill(archive, 20 * 1024)  # room for about two files

        full = site.run()

        assert full.returncode == 1, full.stderr
        assert "No space left on device" in full.stderr and "cannot archive" in full.stderr
        assert "Traceback" not in full.stderr
        no_temporaries(site.import_dir, archive)
        archived = {p.name: read_whole(p) for p in archived_files(archive)}
        left = {site.import_dir / rel: (site.import_dir / rel).read_bytes()
                for rel in site.remaining()}
        assert len(archived) + len(left) == 6 and left, "some files must not have fit"
        assert {read_whole(p).SOPInstanceUID for p in left} | {
            ds.SOPInstanceUID for ds in archived.values()} == set(uids)
        assert {read_whole(p).PatientID for p in left} == {"40"}
        assert len(receiver.received()) == 6

        filler.unlink()
        again = site.run()

        assert again.returncode == 0, again.stderr
        assert len(receiver.received()) == 6, "delivered files were sent again"
        by_rel = archived_in(archive)
        assert len(by_rel) == 6 and site.remaining() == []
        for path, content in left.items():
            assert by_rel[str(path.relative_to(site.import_dir))].read_bytes() == content
        no_temporaries(archive)


@needs_mount
def test_archive_full_at_the_receipt_still_finishes_the_batch(site: Site,
                                                              tmp_path: Path) -> None:
    """Room in ARCHIVE_DIR for the first folder's file but not for its receipt: the files
    are safe either way (archived, or left for retry), but every archived folder ends up with
    its receipt once there is space, no `.partial` is left, and the next folder is still
    processed in the same run."""
    with StoreSCP(tmp_path / "received", extra_args=["+uf"]) as receiver, \
            tmpfs(tmp_path / "archive-fs", "512k") as archive:
        site.use(receiver)
        site.env["ARCHIVE_DIR"] = str(archive)
        make_patient_folder(site.import_dir, "#44-Receipt^Full", 1, rows=64)  # 3 pages
        make_patient_folder(site.import_dir, "#45-Receipt^Full", 1, rows=64)
        filler = fill(archive, 12 * 1024)  # exactly the first file

        full = site.run()
        assert full.returncode == 1, full.stderr
        assert "#45-Receipt^Full/IM00001.dcm: left for retry" in full.stderr, \
            "the second folder was not processed"

        filler.unlink()
        again = site.run()
        assert again.returncode == 0, again.stderr
        assert len(archived_files(archive)) == 2 and site.remaining() == []
        no_temporaries(archive)
        for folder in ("#44-Receipt^Full", "#45-Receipt^Full"):
            (receipt,) = archive.glob(f"*/{folder}.receipt.json")
            assert [f["path"] for f in json.loads(receipt.read_text())["files"]] == \
                ["IM00001.dcm"]


@needs_mount
def test_archive_read_only_at_start_is_a_configuration_error(site: Site, tmp_path: Path,
                                                             storescp: StoreSCP) -> None:
    """A read-only ARCHIVE_DIR is found before anything is stamped or sent: exit 2 (the
    design's configuration error) with a message naming ARCHIVE_DIR; the files are untouched."""
    site.use(storescp)
    paths = make_patient_folder(site.import_dir, "#41-Read^Only", 3, rows=ROWS)
    before = {p: p.read_bytes() for p in paths}
    with tmpfs(tmp_path / "archive-fs", "256k") as archive:
        remount(archive, "ro")
        site.env["ARCHIVE_DIR"] = str(archive)
        result = site.run()
    assert result.returncode == 2, result.stderr
    assert f"ARCHIVE_DIR: {archive} is not a writable directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in paths} == before
    assert storescp.received() == []


@needs_mount
def test_archive_turning_read_only_mid_run_keeps_the_sources(site: Site,
                                                             tmp_path: Path) -> None:
    """The archive file system goes read-only while the files are being sent (a NAS remounting
    after an error): exit 1 with `Read-only file system`, every file stays complete in the
    import dir; once it is writable again the next run archives them without resending."""
    folder = "#42-Turns^ReadOnly"
    with StoreSCP(tmp_path / "slow", extra_args=["+uf", "--sleep-during", "1"]) as slow, \
            tmpfs(tmp_path / "archive-fs", "1m") as archive:
        site.use(slow)
        site.env["ARCHIVE_DIR"] = str(archive)
        uids = uids_of(make_patient_folder(site.import_dir, folder, 2, rows=ROWS))
        process = run_importer_until(site, '"PHASE 2"')
        remount(archive, "ro")
        _out, err = process.communicate(timeout=60)

        assert process.returncode == 1, err
        assert "Read-only file system" in err and "cannot archive" in err
        assert "Traceback" not in err
        assert archived_files(archive) == []
        left = [site.import_dir / rel for rel in site.remaining()]
        assert {read_whole(p).SOPInstanceUID for p in left} == set(uids)
        assert len(slow.received()) == 2

        remount(archive, "rw")
        again = site.run()
        assert again.returncode == 0, again.stderr
        assert len(slow.received()) == 2, "delivered files were sent again"
        assert len(archived_in(archive)) == 2 and site.remaining() == []
        no_temporaries(site.import_dir, archive)


@needs_mount
def test_full_failed_dir_never_loses_why_a_file_was_quarantined(site: Site, tmp_path: Path,
                                                                storescp: StoreSCP) -> None:
    """FAILED_DIR with room for the quarantined file but not for its reason: either the file
    stays in the import dir (as the console says) or its reason is next to it."""
    site.use(storescp)
    folder = site.import_dir / "#43-Failed^Full"
    make_ct(folder / "good.dcm", rows=ROWS)
    make_ct(folder / "whole.dcm", rows=ROWS)
    truncated_copy(folder / "whole.dcm", folder / "cut.dcm", 1000)  # quarantined: unreadable
    (folder / "whole.dcm").unlink()
    with tmpfs(tmp_path / "failed-fs", "256k") as failed:
        site.env["FAILED_DIR"] = str(failed)
        filler = fill(failed, 4096)  # one page: the 1000-byte file fits, its reason does not
        result = site.run()
        assert result.returncode == 1, result.stderr
        quarantined = [p for p in files_under(failed)
                       if p != filler and not p.name.endswith(".reason.txt")]
        still_here = (folder / "cut.dcm").exists()
        if quarantined:
            reason = Path(str(quarantined[0]) + ".reason.txt")
            assert reason.exists() and "DCMTK cannot read this file" in reason.read_text(), \
                "quarantined without its reason"
            assert "cut.dcm: left for retry" not in result.stderr, "says left, but it moved"
        else:
            assert still_here


def test_an_aborted_association_is_never_a_refusal_whatever_storescu_prints_first(
        site: Site, tmp_path: Path) -> None:
    """Found by the fault campaign (chaos seeds 31, 227): with small files storescu prints
    the failure of the files after an abort on its progress line (`XMIT: E: Store Failed,
    file: …`, then `E: 0006:020e DIMSE Failed to send message`); that was read as the
    PACS refusing the file, and after MAX_ATTEMPTS aborts the files were quarantined."""
    site.env["MAX_ATTEMPTS"] = "1"
    uids = uids_of(make_patient_folder(site.import_dir, "#32-Abort^Small", 3, rows=16))
    with StoreSCP(tmp_path / "faulty", extra_args=["--abort-after"]) as faulty:
        site.use(faulty)
        for _ in range(2):
            result = site.run()
            assert result.returncode == 1, result.stderr
    assert "refused by" not in result.stderr
    assert site.failed() == {} and site.archived() == {}
    with StoreSCP(tmp_path / "working") as working:
        site.use(working)
        assert site.run().returncode == 0
        assert {ds.SOPInstanceUID for ds in working.received_datasets()} == set(uids)


@needs_strace
def test_an_io_error_while_stamping_leaves_the_file_for_the_next_run(
        site: Site, storescp: StoreSCP) -> None:
    """Found by the fault campaign (chaos seed 238): dcmodify's rename of the original to
    .bak failing with EIO (the host, not the file) made "the identity could not be
    written" and quarantined a good file at once. It waits for the next run instead."""
    site.use(storescp)
    path = make_patient_folder(site.import_dir, "#33-Io^Error", 1, rows=16)[0]
    original = path.read_bytes()
    argv = ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(path), "-e", "trace=rename",
            "-e", "inject=rename:error=EIO:when=1", IMPORTER, "run-once"]
    failing = subprocess.run(argv, env=site.env, capture_output=True, text=True,
                             errors="replace", timeout=120, stdin=subprocess.DEVNULL)
    assert failing.returncode == 1, failing.stderr
    assert site.failed() == {} and path.read_bytes() == original
    assert "stamping failed on this host" in failing.stderr
    second = site.run()
    assert second.returncode == 0, second.stderr
    assert [ds.PatientID for ds in storescp.received_datasets()] == ["33"]
    assert list(site.archived()) == ["#33-Io^Error/IM00001.dcm"]
