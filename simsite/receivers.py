"""Real DICOM receivers on loopback (DCMTK ``storescp``, Orthanc) for tests, bench and ``make run``.

Tests assert on what a real PACS received, so these start the real programs as plain child
processes (argv lists, never a shell), wait until their port answers and stop them on exit.

Both programs listen on all interfaces: ``storescp`` 3.6.7 has no bind-address option and
Orthanc 1.10 has none either (``RemoteAccessAllowed: false`` only limits HTTP clients to
localhost). Clients here always connect to 127.0.0.1.

Run Orthanc in the foreground (for ``make run``)::

    python -m simsite.receivers orthanc --dir ./var/orthanc --dicom-port 4242 --http-port 8042
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

ORTHANC_BIN = "/usr/sbin/Orthanc"
START_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tcp_nodelay: bool) -> dict[str, str]:
    """Our environment with ``TCP_NODELAY=1`` set or removed: DCMTK reads it at connect time."""
    env = dict(os.environ)
    if tcp_nodelay:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    return env


def _check_free(port: int, what: str) -> None:
    """Fail early when a given port is taken: polling it would find the other server instead."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise RuntimeError(f"{what}: port {port} is already in use ({e})") from None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL it if it has not exited in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class StoreSCP:
    """DCMTK ``storescp`` on a free port, writing every received instance into ``out_dir``.

    ``TCP_NODELAY=1`` is in its environment by default (a tuned PACS; without it each file
    stalls ~44 ms on Nagle/delayed ACK). Files keep storescp's default names
    ``<modality>.<SOPInstanceUID>`` (e.g. ``CT.1.2.3``), flat in ``out_dir``, so a test can
    find an instance by UID. Without ``--fork`` storescp serves one association at a time.
    ``extra_args`` go before the port, e.g. ``["--fork"]``, ``["--refuse"]``,
    ``["--abort-after"]``, ``["--sleep-during", "5"]``, ``["-v"]``. Its output goes to
    ``log_path``.
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        tcp_nodelay: bool = True,
        extra_args: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.aet = aet
        # Private dir for the log (and the output when no out_dir is given), removed on exit.
        self._tmp = Path(tempfile.mkdtemp(prefix="storescp-"))
        self.out_dir = Path(out_dir) if out_dir is not None else self._tmp / "out"
        self.tcp_nodelay = tcp_nodelay
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.log_path = self._tmp / "storescp.log"
        self._final_log: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [
            "storescp",
            "-aet",
            self.aet,
            "-od",
            str(self.out_dir),
            *self.extra_args,
            str(self.port),
        ]

    def start(self) -> Self:
        """Start storescp and return once its port accepts connections (or raise with its log)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _check_free(self.port, "storescp")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(self.tcp_nodelay),
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not _port_open(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"storescp did not listen on {self.host}:{self.port} "
                    f"(exit {self.proc.returncode}): {' '.join(self.argv)}\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def log(self) -> str:
        """storescp's output (add ``-v`` to ``extra_args`` for per-file lines); kept after exit."""
        if self._final_log is not None:
            return self._final_log
        return _tail(self.log_path, 100_000)

    def received(self) -> list[Path]:
        """Paths of the instances received so far, sorted by name (call after the sender ends)."""
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def received_datasets(self) -> list[Any]:
        """The received instances parsed with pydicom (imported here: only tests need it)."""
        import pydicom

        return [pydicom.dcmread(p) for p in self.received()]

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._final_log = self.log()
        shutil.rmtree(self._tmp, ignore_errors=True)


class Orthanc:
    """Orthanc 1.10 (Debian package) as a plain child process with its own config and storage.

    Everything lives in ``work_dir`` (a temporary directory when not given, removed on exit):
    ``orthanc.json``, ``db/`` (storage and SQLite index), ``orthanc.log``, Lua scripts. Ports
    are free ones unless given. ``tcp_nodelay=False`` (default) is Orthanc as Debian ships
    it, Nagle on: one association stalls ~44 ms per file; ``True`` puts ``TCP_NODELAY=1`` in
    its environment. ``lua_scripts`` items are Lua source text (``str``, written to files) or
    paths to existing scripts (``Path``). ``config`` entries override the generated ones.
    Stopping takes Orthanc ~3 s (its HTTP server winds down slowly).
    """

    def __init__(
        self,
        work_dir: str | Path | None = None,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        tcp_nodelay: bool = False,
        lua_scripts: Sequence[str | Path] = (),
        config: dict[str, Any] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.host = "127.0.0.1"
        self.aet = aet
        self.port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self._tmp: Path | None = None
        if work_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="orthanc-"))
            work_dir = self._tmp
        self.work_dir = Path(work_dir).resolve()
        self.tcp_nodelay = tcp_nodelay
        self.lua_scripts = list(lua_scripts)
        self.extra_config = dict(config or {})
        self.start_timeout = start_timeout
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Loopback only: never let an http_proxy from the environment see these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _write_config(self) -> None:
        scripts = []
        for i, script in enumerate(self.lua_scripts):
            if isinstance(script, Path):
                scripts.append(str(script.resolve()))
            else:
                p = self.work_dir / f"script{i}.lua"
                p.write_text(script, encoding="utf-8")
                scripts.append(str(p))
        db = self.work_dir / "db"
        config: dict[str, Any] = {
            "Name": "dicom-importer test",
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "LuaScripts": scripts,
        }
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self) -> Self:
        """Write the config, start Orthanc, return once ``/system`` answers (or raise with log)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _check_free(self.port, "Orthanc DICOM")
        _check_free(self.http_port, "Orthanc HTTP")
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC_BIN, str(self.config_path)],
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(self.tcp_nodelay),
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.get("/system")
                if _port_open(self.host, self.port):
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Orthanc did not answer on {self.url}/system and DICOM port {self.port} "
                    f"(exit {self.proc.returncode}); config {self.config_path}\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def request(self, method: str, path: str, timeout: float = 30.0) -> Any:
        """One REST call; returns the decoded JSON answer (``None`` for an empty body)."""
        req = urllib.request.Request(self.url + path, method=method)
        with self._opener.open(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body.strip() else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance with its main DICOM tags (``/instances?expand``)."""
        return list(self.get("/instances?expand"))

    def patients(self) -> list[dict[str, Any]]:
        """Every stored patient with its main DICOM tags (``/patients?expand``)."""
        return list(self.get("/patients?expand"))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def tags(self, instance_id: str) -> dict[str, Any]:
        """All tags of one instance, decoded by Orthanc (``/instances/<id>/simplified-tags``)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def delete_all(self) -> None:
        """Delete every patient (and so every instance): an empty PACS without a restart."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run a receiver in the foreground until Ctrl-C or SIGTERM (``make run``'s demo PACS)."""
    parser = argparse.ArgumentParser(prog="python -m simsite.receivers", description=main.__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    o = sub.add_parser("orthanc", help="Orthanc with a config and storage under --dir")
    o.add_argument("--dir", type=Path, default=Path("var/orthanc"), help="kept on exit")
    o.add_argument("--dicom-port", type=int, default=4242)
    o.add_argument("--http-port", type=int, default=8042)
    o.add_argument("--aet", default="ORTHANC")
    o.add_argument(
        "--nagle",
        action="store_true",
        help="do not set TCP_NODELAY=1 in Orthanc's environment (Debian default)",
    )
    s = sub.add_parser("storescp", help="DCMTK storescp writing into --dir")
    s.add_argument("--dir", type=Path, default=Path("var/storescp"), help="kept on exit")
    s.add_argument("--port", type=int, default=11112)
    s.add_argument("--aet", default="STORESCP")
    s.add_argument("--nagle", action="store_true", help="do not set TCP_NODELAY=1")
    args = parser.parse_args(argv)

    # Explicit for both: a shell's background job starts with SIGINT ignored.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    receiver: Orthanc | StoreSCP
    if args.kind == "orthanc":
        receiver = Orthanc(
            args.dir,
            aet=args.aet,
            dicom_port=args.dicom_port,
            http_port=args.http_port,
            tcp_nodelay=not args.nagle,
        )
    else:
        receiver = StoreSCP(args.dir, aet=args.aet, port=args.port, tcp_nodelay=not args.nagle)
    try:
        with receiver:
            print(f"{args.kind} up: DICOM {receiver.aet}@127.0.0.1:{receiver.port}", flush=True)
            if isinstance(receiver, Orthanc):
                print(
                    f"  web UI {receiver.url}/app/explorer.html  log {receiver.log_path}",
                    flush=True,
                )
            else:
                print(f"  files in {receiver.out_dir}  log {receiver.log_path}", flush=True)
            print("Ctrl-C to stop", flush=True)
            assert receiver.proc is not None
            code = receiver.proc.wait()
            print(f"{args.kind} exited with {code}; log: {receiver.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print(f"\n{args.kind} stopped", flush=True)
        return 0
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
