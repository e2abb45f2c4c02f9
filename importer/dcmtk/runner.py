"""Running a DCMTK tool: argv in (never a shell), its output streamed line by line, one
log record per call (tool, argv, exit code, seconds, output lines), and a stop for all."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from importer import logs, metrics

log = logging.getLogger("importer.dcmtk")

# One argv must stay well below the kernel's limit (ARG_MAX includes the environment).
_ARGV_BYTES = min(os.sysconf("SC_ARG_MAX") // 4, 512 * 1024)
_ARGV_FILES = 1000


class DcmtkMissing(Exception):
    """A DCMTK tool is not installed; the message says how to fix it."""


@dataclass
class ToolRun:
    tool: str
    argv: list[str]
    exit_code: int
    seconds: float
    lines: list[str] = field(default_factory=list)

    def said(self) -> str:
        """The tool's error and fatal lines, on one line (for a reason file or a log)."""
        return " | ".join(line for line in self.lines if line[:3] in ("E: ", "F: "))


class Stopped(Exception):
    """The importer is shutting down: no new DCMTK call starts."""


_running: dict[int, subprocess.Popen[bytes]] = {}
# Reentrant: request_stop runs in a signal handler, on the main thread, which may be holding
# it at that very moment (starting a tool).
_running_lock = threading.RLock()
_stopping = threading.Event()


def request_stop() -> None:
    """On SIGTERM: end every running DCMTK process and refuse to start new ones.

    A killed storescu leaves its unanswered files for the next run; a killed dcmodify leaves
    its .bak files, which the intent file has the next run put back.
    """
    _stopping.set()
    with _running_lock:
        for command in list(_running.values()):
            with contextlib.suppress(Exception):  # already gone
                command.terminate()


def stop_requested(wait: float) -> bool:
    """Sleep up to wait seconds; True at once if the importer is shutting down.

    On the main thread it polls instead of Event.wait: the signal handler's Event.set runs on
    that thread too, and would deadlock on the Event's lock if the signal came while wait
    held it (a SIGTERM during run-once's settle wait hung it, one time in five under load)."""
    if threading.current_thread() is not threading.main_thread():
        return _stopping.wait(wait)
    deadline = time.monotonic() + wait
    while not _stopping.is_set() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))
    return _stopping.is_set()


@functools.cache
def tool_path(tool: str) -> str:
    """Where a DCMTK tool is: the first on PATH, never in this program's own Python
    environment (pynetdicom, a test dependency, installs scripts named storescu, findscu…
    there, which an activated virtualenv would otherwise put first)."""
    own_bin = os.path.dirname(os.path.abspath(sys.executable))
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if not directory or os.path.abspath(directory) == own_bin:
            continue
        candidate = os.path.join(directory, tool)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise DcmtkMissing(f"{tool} not found — install dcmtk (apt-get install dcmtk)")


# dcmdump and dcmodify go without the private-tag dictionary: loading it is half of each
# start's ~21 ms of CPU (a 30,000-file drain starts them ~240 times). Neither needs it here:
# dcmdump reads standard tags only, and dcmodify writes the file back in its own transfer
# syntax, so a private element's bytes pass unchanged (79 public samples, private and UN
# sequences among them: byte-identical output, the same messages and exit codes). storescu,
# which may convert a file between transfer syntaxes (a private element's VR then matters),
# and dcmconv, which converts the character set of the string elements it knows, keep it.
_STANDARD_DICTIONARY_TOOLS = frozenset({"dcmdump", "dcmodify"})


@functools.cache
def standard_dictionary() -> str | None:
    """The standard dictionary file the tools load (dcmdump says which, at debug level),
    when they load exactly it and private.dic; None (leave them as they are) otherwise,
    and when DCMDICTPATH is set: a site's own dictionary stays whole."""
    if "DCMDICTPATH" in os.environ:
        return None
    probe = run("dcmdump", ["-ll", "debug", "/dev/null"], full_dictionary=True)
    loaded = [line.split("Loading file: ", 1)[1] for line in probe.lines
              if "DcmDataDictionary: Loading file: " in line]
    if len(loaded) == 2 and [os.path.basename(path) for path in loaded] == [
            "dicom.dic", "private.dic"] and os.path.isfile(loaded[0]):
        return loaded[0]
    return None


def run(
    tool: str,
    args: Sequence[str],
    *,
    on_line: Callable[[str], bool | None] | None = None,
    network: bool = False,
    pinned: Mapping[int, str] | None = None,
    data: tuple[str, ...] = (),
    full_dictionary: bool = False,
) -> ToolRun:
    """Run one DCMTK tool to completion, streaming its merged stdout/stderr to on_line;
    on_line returning True ends the tool early (e.g. storescu after a DIMSE timeout);
    pinned: descriptor -> file, the open files the tool inherits and reads as /dev/fd/N
    (its output, to on_line and in the log record, names the files); data: the prefixes of
    the lines that are data for on_line (dcmdump's values, dcmftest's verdicts), which the
    log record counts instead of repeating (they were 84 % of a batch's log: 79 MB of
    dcmdump output for 30,000 files, written twice); blank lines go with them;
    full_dictionary: dcmdump or dcmodify with the private-tag dictionary too."""
    if _stopping.is_set():
        raise Stopped(f"not starting {tool}: shutting down")
    argv = [tool_path(tool), *args]
    env = dict(os.environ)
    if network:
        env["TCP_NODELAY"] = "1"  # avoids a ~44 ms Nagle/delayed-ACK stall per file
    if tool in _STANDARD_DICTIONARY_TOOLS and not full_dictionary and (
            dictionary := standard_dictionary()):
        env["DCMDICTPATH"] = dictionary
    lines: list[str] = []
    started = time.monotonic()
    # The tool writes straight into a pipe (stdout and stderr merged) that this thread reads
    # in 64 KiB blocks, split into lines in C. Started by subprocess (vfork and exec, 0.9 ms
    # a call), not sh: sh forks the whole interpreter and runs Python in the child, 15 ms
    # of CPU a call at the importer's 78 MB, a tenth of a 50,000-file drain's CPU.
    read_fd, write_fd = os.pipe()
    try:
        running = subprocess.Popen(  # argv, never a shell; non-UTF-8 names pass unchanged
            argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=subprocess.STDOUT,
            env=env, pass_fds=tuple(pinned or ()), close_fds=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the tool holds its own copy: EOF comes when it exits
    with _running_lock:
        _running[id(running)] = running
        if _stopping.is_set():  # asked to stop while it was starting
            running.terminate()
    try:
        with open(read_fd, encoding="utf-8", errors="surrogateescape", newline="",
                  buffering=1 << 16) as output:
            for raw in output:
                line = raw.rstrip("\r\n")
                if pinned and "/dev/fd/" in line:
                    line = _named(line, pinned)
                lines.append(line)
                if on_line is not None and on_line(line) is True:
                    running.terminate()  # the parser has seen enough: end the tool now
                    on_line = None
        exit_code = running.wait()  # -N: ended by signal N
    finally:
        with _running_lock:
            _running.pop(id(running), None)
    result = ToolRun(tool, [tool, *args], exit_code, time.monotonic() - started, lines)
    metrics.tool_ran(tool, result.seconds)
    argv, output = result.argv, lines
    extra: dict[str, object] = {}
    if data:
        output = [line for line in lines if line and not line.startswith(data)]
        extra["data_lines"] = len(lines) - len(output)
    if pinned:
        argv = [_named(arg, pinned) for arg in argv]
    if logs.hiding_names():  # LOG_PATIENT_NAMES=false: no PatientName value in the record
        argv = [mask_patient_name(arg) for arg in argv]
        output = [mask_patient_name(line) for line in output]
    log.debug(
        "%s exit %s in %.3f s", tool, exit_code, result.seconds,
        extra={"tool": tool, "argv": argv, "exit_code": exit_code,
               "duration": round(result.seconds, 4), "output": output, **extra},
    )
    return result


# `(0010,0010)=<name>` in dcmodify's argv; `(0010,0010) PN [<name>]  # 8, 1 PatientName` (or
# a UN/SQ rendering) in dcmdump's output: the value up to the length comment goes.
_PATIENT_NAME_VALUE = re.compile(
    r"(?P<head>\(0010,0010\)(?:=| [A-Za-z]{2} ))(?P<value>.*?)(?=\s+#\s*(?:\d+|u/l),|$)")


def mask_patient_name(text: str) -> str:
    """text with any PatientName value, as DCMTK's argv and dumps spell it, replaced by ***."""
    if "(0010,0010)" not in text:
        return text
    return _PATIENT_NAME_VALUE.sub(lambda m: m["head"] + logs.MASK, text)


_PINNED = re.compile(r"/dev/fd/(\d+)")


def _named(text: str, pinned: Mapping[int, str]) -> str:
    """text with each /dev/fd/N replaced by the file it is."""
    return _PINNED.sub(lambda m: pinned.get(int(m[1]), m[0]), text)


def chunked(paths: Sequence[str], fixed_bytes: int = 0) -> Iterator[list[str]]:
    """Split paths into argv-sized chunks."""
    chunk: list[str] = []
    size = fixed_bytes
    for path in paths:
        cost = len(path.encode("utf-8", "surrogateescape")) + 1 + 8  # + NUL + argv pointer
        if chunk and (size + cost > _ARGV_BYTES or len(chunk) >= _ARGV_FILES):
            yield chunk
            chunk, size = [], fixed_bytes
        chunk.append(path)
        size += cost
    if chunk:
        yield chunk


def versions() -> dict[str, str]:
    """Installed DCMTK tool versions (for `importer check` and logs)."""
    found = {}
    for tool in ("dcmftest", "dcmdump", "dcmodify", "dcmconv", "storescu", "echoscu", "findscu"):
        try:
            first = run(tool, ["--version"]).lines
        except DcmtkMissing as exc:
            found[tool] = str(exc)
            continue
        found[tool] = next((line for line in first if "dcmtk" in line), "unknown").strip("$ ")
    return found
