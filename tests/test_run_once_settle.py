"""run-once right after a copy: files younger than SETTLE_SECONDS that nobody is writing are
waited for once, for the whole batch, and taken in the same run; a file held open for
writing, or written again during the wait, stays for the next run (real storescp)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from chaos.runner import clock_env
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import StoreSCP
from simsite.site import IMPORTER, Site
from tests.test_share import FOLDER, assert_whole_and_stamped, sources  # noqa: F401 (fixture)

SETTLE = 3.0
WAIT_LINE = re.compile(r"(\d+) files? changed less than 3 s ago and nobody is writing them: "
                       r"waiting ([0-9.]+) s for them to settle")

# Holds a file open for writing (as a stalled smbd or modality would) until stdin closes.
HOLDER = r"""
import sys
fh = open(sys.argv[1], "ab")
print("holding", flush=True)
sys.stdin.read()
fh.close()
"""


def copy_in(src: Path, site: Site) -> float:
    """cp -r into the import dir; returns when it finished (wall clock)."""
    shutil.copytree(src, site.import_dir / src.name)
    return time.time()


def run_once_until_it_waits(site: Site) -> tuple[subprocess.Popen[str], list[str]]:
    """run-once started in the background; returns once it said it waits (its lines so far)."""
    run = subprocess.Popen([IMPORTER, "run-once"], env=site.env, cwd=site.root, text=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, errors="replace")
    assert run.stderr is not None
    seen = []
    for line in run.stderr:
        seen.append(line)
        if "nobody is writing them: waiting" in line:
            return run, seen
    raise AssertionError("run-once did not wait:\n" + "".join(seen))


def test_run_once_right_after_a_copy_waits_once_and_takes_everything(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Two folders copied a second apart just before run-once: one wait (as long as the
    youngest file needs, no longer), then both delivered and archived, exit 0."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    src = tmp_path / "sources"
    make_patient_folder(src, "#501-First^Copy", 3, subdirs=2)
    make_patient_folder(src, "#502-Second^Copy", 2)
    copy_in(src / "#501-First^Copy", site)
    time.sleep(1)
    last_copy = copy_in(src / "#502-Second^Copy", site)

    start = time.time()
    result = site.run()
    end = time.time()
    assert result.returncode == 0, result.stderr
    waits = WAIT_LINE.findall(result.stderr)
    assert len(waits) == 1, result.stderr  # one wait for the batch, not one per folder
    count, waited = int(waits[0][0]), float(waits[0][1])
    assert count == 5
    remaining = last_copy + SETTLE - start  # what the youngest file still needed
    assert 0 < waited <= min(SETTLE, remaining + 0.1), (waited, remaining)
    assert end - last_copy >= SETTLE  # nothing was taken before it had settled
    assert end - start <= remaining + 8, end - start  # the wait, and the usual work
    assert result.stderr.index("waiting") < result.stderr.index("[PHASE 1.5]")
    assert "still being written or incomplete" not in result.stderr
    storescp.stop()
    assert len(storescp.received()) == 5
    assert len(site.archived()) == 5 and site.failed() == {} and site.remaining() == []


def test_a_file_held_open_for_writing_is_not_waited_for(
        site: Site, storescp: StoreSCP, sources: Path) -> None:  # noqa: F811
    """One of four fresh files is held open for writing by another process: the three
    others are waited for, then wait with it, the folder whole (chaos seed 35); all stays
    (exit 1) until its writer closes, and the next run takes the folder."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    target = site.import_dir / FOLDER
    shutil.copytree(sources, target)
    held = target / "IM00004.dcm"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        before = held.read_bytes()
        result = site.run()
        assert result.returncode == 1, result.stderr
        assert [count for count, _ in WAIT_LINE.findall(result.stderr)] == ["3"], result.stderr
        assert "IM00004.dcm: still being written or incomplete" in result.stderr
        assert "open for writing by another process" in result.stderr
        assert held.read_bytes() == before and not list(target.glob("*.bak"))
        assert "3 settled files of the folder wait for the rest of it" in result.stderr
        assert storescp.received() == [] and site.archived() == {}
        assert len(site.remaining()) == 4
    finally:
        holder.communicate(timeout=10)

    result = site.run()  # its writer is gone: taken now
    assert result.returncode == 0, result.stderr
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {f"IM0000{i}.dcm" for i in range(1, 5)})


def test_a_file_written_again_during_the_wait_stays_for_the_next_run(
        site: Site, storescp: StoreSCP, sources: Path) -> None:  # noqa: F811
    """A writer comes back to one file while run-once waits for it to settle: that file is
    not taken in this run (exit 1), nor are the others (the folder waits whole: chaos seed
    35); the next run takes them all."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    target = site.import_dir / FOLDER
    shutil.copytree(sources, target)
    run, seen = run_once_until_it_waits(site)
    rewritten = target / "IM00003.dcm"
    rewritten.write_bytes(rewritten.read_bytes())  # the same bytes, written again
    stderr = "".join(seen) + run.communicate(timeout=120)[1]
    assert run.returncode == 1, stderr
    assert "IM00003.dcm: still being written" in stderr
    assert "changed while waiting to settle" in stderr
    assert storescp.received() == [] and site.archived() == {}
    assert len(site.remaining()) == 4

    result = site.run()  # right away (waiting for that file if it is still young)
    assert result.returncode == 0, result.stderr
    storescp.stop()
    assert_whole_and_stamped(site, storescp, sources, {f"IM0000{i}.dcm" for i in range(1, 5)})


def test_a_file_arriving_during_the_wait_holds_its_folder_whole(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Found by the fault campaign (chaos seed 94): run-once waited for the first file of a
    copy to settle; meanwhile the copy brought the next files, another patient's CD, which
    the listing had not seen; the waited file went out under the folder's ID. A file that
    appears during the wait is still arriving: the folder waits whole, and the next run,
    seeing both CDs, holds it unsent."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    target = site.import_dir / FOLDER
    make_ct(target / "CD1" / "IM00001.dcm", rows=16, birth_date="19500101", sex="F")
    run, seen = run_once_until_it_waits(site)
    make_ct(target / "CD2" / "IM00001.dcm", rows=16, birth_date="19990909", sex="M")
    stderr = "".join(seen) + run.communicate(timeout=120)[1]
    assert run.returncode == 1, stderr
    assert storescp.received() == [] and site.archived() == {}, stderr
    assert "arrived while waiting to settle" in stderr

    time.sleep(SETTLE)
    result = site.run()
    assert result.returncode == 1, result.stderr
    assert f"{FOLDER}: held" in result.stderr
    storescp.stop()
    assert storescp.received() == [] and site.archived() == {} and len(site.remaining()) == 2


def test_sigterm_ends_the_wait_at_once(site: Site, storescp: StoreSCP,
                                       sources: Path) -> None:  # noqa: F811
    """Told to stop while it waits: run-once ends at once (exit 1), nothing sent or moved."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = "30"
    target = site.import_dir / FOLDER
    shutil.copytree(sources, target)
    run, seen = run_once_until_it_waits(site)
    stopped = time.monotonic()
    run.send_signal(signal.SIGTERM)
    stderr = "".join(seen) + run.communicate(timeout=30)[1]
    assert run.returncode == 1, stderr
    assert time.monotonic() - stopped < 2, stderr
    assert "SIGTERM received" in stderr
    assert storescp.received() == [] and site.archived() == {}
    assert site.remaining() == [f"{FOLDER}/IM0000{i}.dcm" for i in range(1, 5)]


def _clock_off_by(site: Site, seconds: float) -> None:
    """The importer's wall clock (and its DCMTK tools') `seconds` off the kernel's, which
    stamps the files: a network mount whose server's clock runs ahead, or an NTP step."""
    site.env |= clock_env(site.root / "clock", seconds)


def test_run_once_with_its_clock_an_hour_behind_the_share_takes_a_settled_copy(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """Files are aged by the share's clock, not ours: an hour behind, every file had looked
    'changed -3600 s ago' and stayed for an hour (chaos seeds 5 and 21: clock-jump)."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    make_patient_folder(tmp_path / "src", "#503-Behind^Clock", 3)
    copy_in(tmp_path / "src" / "#503-Behind^Clock", site)
    time.sleep(SETTLE + 0.5)
    _clock_off_by(site, -3600)
    result = site.run()
    assert result.returncode == 0, result.stderr
    assert "waiting" not in result.stderr and "changed -" not in result.stderr
    storescp.stop()
    assert len(storescp.received()) == 3
    assert len(site.archived()) == 3 and site.remaining() == []


def test_run_once_with_its_clock_an_hour_ahead_waits_for_a_fresh_copy(
        site: Site, storescp: StoreSCP, tmp_path: Path) -> None:
    """An hour ahead, a file copied a moment ago is still young by the share's clock: it is
    waited for (once, SETTLE_SECONDS at most), not taken at once as an hour old."""
    site.use(storescp)
    site.env["SETTLE_SECONDS"] = f"{SETTLE:g}"
    _clock_off_by(site, 3600)
    make_patient_folder(tmp_path / "src", "#504-Ahead^Clock", 2)
    last_copy = copy_in(tmp_path / "src" / "#504-Ahead^Clock", site)
    result = site.run()
    end = time.time()
    assert result.returncode == 0, result.stderr
    waits = WAIT_LINE.findall(result.stderr)
    assert len(waits) == 1 and int(waits[0][0]) == 2, result.stderr
    assert end - last_copy >= SETTLE  # nothing was taken before it had settled
    storescp.stop()
    assert len(storescp.received()) == 2 and len(site.archived()) == 2
