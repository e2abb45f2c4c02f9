"""Writers on the share: separate processes, as smbd or a modality would be, that write part of
a file, stall holding it open (or closed), and finish on a signal."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from simsite.site import wait_for

# A writer: copies SRC to DST in two parts. It writes the first SPLIT bytes, then waits
# until the file GO exists (holding DST open, or closed when CLOSE_BETWEEN), then writes
# the rest. Started as its own process, like smbd or a modality.
WRITER = r"""
import os, sys, time
src, dst, split, go, close_between = sys.argv[1:6]
data = open(src, "rb").read()
split = int(split)
fh = open(dst, "wb")
fh.write(data[:split]); fh.flush()
if close_between == "1":
    fh.close()
open(go + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.02)
if close_between == "1":
    fh = open(dst, "ab")
fh.write(data[split:]); fh.flush(); fh.close()
"""


class Writer:
    """A writer process stalled part-way through a copy until release()."""

    def __init__(self, src: Path, dst: Path, split: int, *, close_between: bool = False,
                 control_dir: Path | None = None) -> None:
        control = control_dir or dst.parent.parent.parent  # outside the import dir
        self.go = control / f"go-{dst.name}-{time.monotonic_ns()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(src), str(dst), str(split), str(self.go),
             "1" if close_between else "0"])
        wait_for(lambda: Path(str(self.go) + ".ready").exists(), 10)

    def release(self) -> None:
        self.go.touch()
        assert self.process.wait(timeout=10) == 0


def pixel_offset(path: Path) -> int:
    """Where the PixelData element starts: a writer stalled there wrote just the header."""
    return path.read_bytes().index(b"\xe0\x7f\x10\x00")
