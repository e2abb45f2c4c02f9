"""`make run`: a local demo — Orthanc as the PACS and `importer watch` on ./var/import.

Orthanc listens on 127.0.0.1 (DICOM ORTHANC@4242, web 8042) with its storage under
./var/orthanc; the importer archives into ./var/archived and logs into ./var/log. A sample
patient folder is dropped in at start so there is something to see. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from simsite.dicomgen import make_patient_folder
from simsite.receivers import Orthanc

IMPORTER = str(Path(sys.executable).parent / "importer")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Explicit: a job started in the background begins with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--var", type=Path, default=Path("var"))
    parser.add_argument("--delay", type=int, default=5, help="quiet period (DELAY), seconds")
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--status-port", type=int, default=8088, help="the importer's page")
    parser.add_argument("--no-sample", action="store_true", help="do not drop a sample folder")
    args = parser.parse_args()
    var = args.var.resolve()
    dirs = {name: var / name for name in ("import", "archived", "failed", "log", "state")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)

    with Orthanc(var / "orthanc", dicom_port=args.dicom_port, http_port=args.http_port,
                 tcp_nodelay=True) as pacs:
        env = {**os.environ, "IMPORT_DIR": str(dirs["import"]),
               "ARCHIVE_DIR": str(dirs["archived"]), "FAILED_DIR": str(dirs["failed"]),
               "LOG_DIR": str(dirs["log"]), "STATE_DIR": str(dirs["state"]),
               "PACS_SERVER_IP": pacs.host, "PACS_SERVER_PORT": str(pacs.port),
               "PACS_AET": pacs.aet, "DELAY": str(args.delay),
               "STATUS_LISTEN": f"127.0.0.1:{args.status_port}"}
        print(f"""
  Demo PACS   Orthanc {pacs.aet}@{pacs.host}:{pacs.port}   web: {pacs.url}/app/explorer.html
  Importer    status page: http://127.0.0.1:{args.status_port}/   metrics: /metrics
  Import dir  {dirs['import']}   (quiet period {args.delay} s)
  Archive     {dirs['archived']}   logs: {dirs['log']}

  Drop a folder named '#<id>-<name>' (e.g. '#12345-홍길동') holding DICOM files into the
  import dir, wait {args.delay} s, and open {pacs.url}/app/explorer.html. Ctrl-C stops both.
""", flush=True)
        watcher = subprocess.Popen([IMPORTER, "watch"], env=env, stdin=subprocess.DEVNULL)
        if not args.no_sample:
            _drop_sample(dirs["import"])
        try:
            return watcher.wait()
        except KeyboardInterrupt:
            watcher.send_signal(signal.SIGINT)
            return watcher.wait()


def _drop_sample(import_dir: Path) -> None:
    """Build the sample elsewhere and move it in, as a user's file manager would."""
    with tempfile.TemporaryDirectory(dir=import_dir.parent) as staging:
        make_patient_folder(staging, "#12345-홍길동", 5, rows=64)
        target = import_dir / "#12345-홍길동"
        if not target.exists():
            shutil.move(Path(staging) / "#12345-홍길동", target)


if __name__ == "__main__":
    sys.exit(main())
