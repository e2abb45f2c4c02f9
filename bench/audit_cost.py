"""What `importer audit` (and so a verifying prune) costs: N archived folders, one study
each, against Orthanc with C-FIND on loopback. One C-FIND per study and destination.

    .venv/bin/python bench/audit_cost.py --folders 1000

The folders are archived the way the importer archives them (a receipt beside each), but
written directly, and the instances sent to Orthanc with one storescu, to keep set-up short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simsite.dicomgen import make_ct  # noqa: E402
from simsite.receivers import Orthanc  # noqa: E402

IMPORTER = Path(sys.executable).parent / "importer"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folders", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp, \
            Orthanc(tcp_nodelay=True) as orthanc:
        root = Path(tmp)
        (root / "import").mkdir()
        batch = root / "archived" / time.strftime("%Y%m%d_%H%M%S")
        files = []
        for i in range(args.folders):
            folder = batch / f"#{i + 1}-Audit^Bench"
            path = folder / "IM00001.dcm"
            sop = make_ct(path, rows=8, patient_id=str(i + 1), patient_name="Audit^Bench",
                          study_uid=f"1.2.826.0.1.3680043.8.498.77.{i + 1}")
            receipt = {"folder": folder.name, "patient": {"id": str(i + 1), "name": "x"},
                       "files": [{"path": "IM00001.dcm", "sent": True, "sop_instance_uid": sop,
                                  "study_instance_uid": f"1.2.826.0.1.3680043.8.498.77.{i + 1}",
                                  "destinations": {"primary": {"c_store_status": "Success"}}}]}
            folder.with_name(folder.name + ".receipt.json").write_text(json.dumps(receipt))
            files.append(str(path))
        subprocess.run(["storescu", "-aec", orthanc.aet, orthanc.host, str(orthanc.port),
                        *files], check=True, env={**os.environ, "TCP_NODELAY": "1"})
        env = {**os.environ, "IMPORT_DIR": str(root / "import"),
               "ARCHIVE_DIR": str(root / "archived"), "FAILED_DIR": str(root / "failed"),
               "LOG_DIR": str(root / "log"), "STATE_DIR": str(root / "state"),
               "PACS_SERVER_IP": orthanc.host, "PACS_SERVER_PORT": str(orthanc.port),
               "PACS_AET": orthanc.aet}
        started = time.perf_counter()
        result = subprocess.run([str(IMPORTER), "audit"], env=env, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - started
        print((result.stdout.splitlines() or [result.stderr[-2000:]])[-1])
        print(f"importer audit: {args.folders} archived folders (one study each) against"
              f" Orthanc: {seconds:.1f} s, {seconds / args.folders * 1000:.1f} ms per folder;"
              f" exit {result.returncode}")
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())
