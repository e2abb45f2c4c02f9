"""The share: is a file settled (nothing still writing it), and is it still what we read?

The import dir is shared with writers the importer does not control (smbd, a modality, a
DICOM receiver, rsync), usually in another container on the same kernel. No single signal
says "finished" everywhere, so three are combined (see DESIGN.md, "The share"):

- age: the file changed (mtime or ctime) less than SETTLE_SECONDS ago;
- a read lease: ``F_SETLEASE F_RDLCK`` fails with EAGAIN while any process on this kernel,
  in any container, holds the file open for writing (needs the file's owner or CAP_LEASE;
  says nothing about writers on the far side of an NFS/CIFS mount);
- ``/proc/*/fdinfo``: writers in our PID namespace, where the lease cannot be taken.

A file's identity (device, inode, size, mtime, ctime) is recorded when it is read; before
every irreversible step the file must still be that inode with that size and mtime, and
nobody may hold it open for writing. The journal keys deliveries by size, mtime and ctime
(which no user-space call can set back), so a version rewritten with its old mtime restored
is still a new version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

_WRITE_MODES = os.O_WRONLY | os.O_RDWR


@dataclass(frozen=True, slots=True)
class Identity:
    """What a file was when it was read; any write or replacement changes it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_content(self, other: Identity | None) -> bool:
        """The same inode with the same bytes (a rename changes ctime, nothing else)."""
        return other is not None and (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns)

    def changed_at(self) -> float:
        return max(self.mtime_ns, self.ctime_ns) / 1e9


def identity(path: str) -> Identity | None:
    try:
        return Identity.of(os.lstat(path))
    except OSError:
        return None


def _ignore_sigio() -> None:
    """A lease break is signalled with SIGIO, whose default action kills the process. We
    hold a lease only for an instant, but a writer opening the file in that instant must
    not kill the importer."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def open_for_writing(path: str) -> bool | None:
    """True if another process holds path open for writing; None if a lease cannot tell
    (not the file's owner and no CAP_LEASE, or a network filesystem)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def writers_in_proc() -> dict[tuple[int, int], str]:
    """(device, inode) -> 'pid N (comm)' for every file some process we can see holds open
    for writing. One walk over /proc; processes in other PID namespaces are not seen."""
    found: dict[tuple[int, int], str] = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as info:
                    flags_line = next(line for line in info if line.startswith(b"flags:"))
                if not int(flags_line.split()[1], 8) & _WRITE_MODES:
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            found[(st.st_dev, st.st_ino)] = f"pid {pid} ({_comm(pid)})"
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


@dataclass(frozen=True, slots=True)
class Unsettled:
    """Why a file is not taken now; by_age_alone: only its age keeps it back (nobody is
    writing it, as far as the lease and /proc can tell), so waiting it out may be enough."""

    why: str
    by_age_alone: bool = False


CLOCK_PROBE = ".dicom-importer-clock"  # hidden at the top of the import dir: never a folder


def share_time(directory: str | os.PathLike[str]) -> float:
    """Now, by the clock that stamps the share's files: a file's age is that clock's reading
    minus its ctime. Our own wall clock may differ and step (an NTP correction, a network
    mount whose server's clock runs ahead): an hour behind, every file would stay "changed
    -3600 s ago" for an hour; ahead, a file paused mid-copy would look settled (chaos:
    clock-jump). A byte written to a hidden file, which is removed again; our clock if that
    cannot be done."""
    path = os.path.join(directory, CLOCK_PROBE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return time.time()
    try:
        os.pwrite(fd, b"\n", 0)
        st = os.fstat(fd)
        return max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
    except OSError:
        return time.time()
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


class SettleCheck:
    """Tells which files are still being written. Build one per folder check: the /proc
    walk is done at most once, and only when a lease could not tell for some file."""

    def __init__(self, settle_seconds: float, now: float | None = None,
                 share: str | os.PathLike[str] | None = None) -> None:
        self.settle_seconds = settle_seconds
        self.share = share  # the import dir, whose clock ages its files (share_time)
        self.now = self._clock() if now is None else now
        self._proc: dict[tuple[int, int], str] | None = None
        _ignore_sigio()

    def from_now(self) -> SettleCheck:
        """The same check, its clock read again (for the next folder of a batch)."""
        self.now = self._clock()
        return self

    def _clock(self) -> float:
        return time.time() if self.share is None else share_time(self.share)

    def why_unsettled(self, path: str, ident: Identity | None) -> str | None:
        """Why path must not be taken now (None: settled)."""
        found = self.judge(path, ident)
        return None if found is None else found.why

    def judge(self, path: str, ident: Identity | None, *,
              ask_young: bool = False) -> Unsettled | None:
        """Why path must not be taken now (None: settled). With ask_young (run-once), a file
        kept back by its age is asked about writers too, so that one nobody is writing can
        be waited for; watch does not ask (its quiet period waits anyway)."""
        if ident is None:
            return Unsettled("vanished while being looked at")
        age = self.now - ident.changed_at()
        if age < self.settle_seconds:
            if ask_young and (writer := self._writer(path, ident)) is not None:
                return Unsettled(writer)
            return Unsettled(
                f"changed {max(age, 0):.1f} s ago (SETTLE_SECONDS {self.settle_seconds:g})",
                by_age_alone=ask_young)
        writer = self._writer(path, ident)
        return None if writer is None else Unsettled(writer)

    def _writer(self, path: str, ident: Identity) -> str | None:
        """Who holds path open for writing, as far as the lease or /proc can tell."""
        lease = open_for_writing(path)
        if lease:
            return "open for writing by another process"
        if lease is None:
            if self._proc is None:
                self._proc = writers_in_proc()
            if (writer := self._proc.get((ident.dev, ident.ino))) is not None:
                return f"open for writing by {writer}"
        return None

    def unsettled(self, files: Iterable[tuple[str, Identity | None]], *,
                  ask_young: bool = False) -> dict[str, Unsettled]:
        return {path: found for path, ident in files
                if (found := self.judge(path, ident, ask_young=ask_young)) is not None}


def changed_since(path: str, recorded: Identity) -> str | None:
    """Why path is no longer what was recorded (None: it is), or is held by a writer."""
    now = identity(path)
    if now is None:
        return "vanished"
    if not recorded.same_content(now):  # (our own renames change ctime alone)
        return "replaced" if (now.dev, now.ino) != (recorded.dev, recorded.ino) else "changed"
    if open_for_writing(path):
        return "opened for writing by another process"
    return None


# --- what a half-written file looks like ----------------------------------------------------

# Image Storage SOP classes (PS3.4 B.5.1): their instances carry pixel data. A file of one
# of them, or with the Image Pixel module's Rows, but without PixelData is a writer that
# stopped after the header. SR, KO, PR, RTSTRUCT, raw data and the like legitimately have none.
_IMAGE_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1."
_IMAGE_CLASSES = frozenset(_IMAGE_CLASS_ROOT + suffix for suffix in (
    "1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1", "2", "2.1", "2.2", "3.1", "4", "4.1",
    "4.3", "4.4", "6.1", "6.2", "6.3", "7", "7.1", "7.2", "7.3", "7.4", "12.1", "12.1.1", "12.2",
    "12.2.1", "12.3", "13.1.1", "13.1.2", "13.1.3", "13.1.4", "13.1.5", "14.1", "14.2", "20",
    "30", "128", "128.1", "130", "481.1", "77.1.1", "77.1.1.1", "77.1.2", "77.1.2.1", "77.1.3",
    "77.1.4", "77.1.4.1", "77.1.5.1", "77.1.5.2", "77.1.5.4", "77.1.5.5", "77.1.5.7", "77.1.5.8",
    "77.1.6", "77.1.7",
))


def image_without_pixels(values: dict[str, str], sop_class: str, rows_tag: str,
                         pixel_tags: Iterable[str]) -> bool:
    """An image (by SOP class or the Image Pixel module) that has no pixel data element."""
    if any(tag in values for tag in pixel_tags):
        return False
    return rows_tag in values or sop_class in _IMAGE_CLASSES


def read_head(path: str, size: int) -> bytes | None:
    """The first size bytes of path (None: it cannot be read), for sniff.py to judge."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError:
        return None
