"""A receipt beside each archived folder: what was sent where, and what the PACS said.

`ARCHIVE_DIR/<ts>/<folder>.receipt.json` lists per file its relative path, size, SOP and
Study Instance UIDs, and per destination the C-STORE status, when, and whether the PACS
listed it by C-FIND under the folder's PatientID. It proves what the PACSs answered at
that time; it does not prove what they still hold today, nor that the images are right.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from importer.config import Destination, Settings
from importer.journal import Delivery, FileKey
from importer.logs import MASK
from importer.sniff import DICOMDIR, OTHER

if TYPE_CHECKING:
    from importer.model import Folder, SourceFile
    from importer.verify import Verifier


def receipt_path(target_root: Path) -> Path:
    return target_root.with_name(target_root.name + ".receipt.json")


def build_receipt(target_root: Path, folder: Folder, settings: Settings,
                  verifier: Verifier) -> dict[str, Any]:
    """The receipt for files about to be archived, but its files (receipt_entries)."""
    receipt: dict[str, Any] = {
        "folder": folder.name,
        "patient": {"id": folder.patient.id,
                    "name": folder.patient.name if settings.log_patient_names else MASK},
        "archive": str(target_root),
        "destinations": [
            {"name": d.name, "destination": d.label, "required": d.required,
             "verification": _verification(d, verifier)}
            for d in settings.destinations],
        "written_at": _iso(time.time()),
    }
    if folder.reconciliation is not None:  # is it the right patient: what each source said
        receipt["identity_check"] = folder.reconciliation
    if folder.released is not None:  # a person accepted a hold
        receipt["release"] = folder.released
    return receipt


def receipt_entries(target_root: Path, folder: Folder, archived: list[tuple[SourceFile, str]],
                    deliveries: dict[str, dict[FileKey, Delivery]], settings: Settings,
                    ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(target, entry) per file about to be archived, one at a time (only the files that
    get to their targets are listed); first those of an earlier run into the same batch."""
    path = receipt_path(target_root)
    if path.exists():  # a second run archived more of this folder into the same batch
        earlier = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
        for entry in earlier.get("files", []):
            yield "", entry
    unsent = {f.path for f in folder.unsent}
    for source, target in archived:
        entry: dict[str, Any] = {"path": source.rel, "size": source.size}
        if source.path in folder.members:  # unpacked: which archive, which member of it
            entry |= folder.members[source.path]
        if source.path in unsent:
            entry["sent"] = False
            kind = folder.unsent_kinds.get(source.path, OTHER)
            what = ("a DICOMDIR (a CD's index, not an image)" if kind == DICOMDIR
                    else f"not DICOM ({kind[0]})")
            entry["why"] = f"{what}: archived with its folder, never sent"
        else:
            entry |= {"sent": True, "sop_instance_uid": source.sop_uid,
                      "study_instance_uid": source.study_uid, "destinations": {}}
            if source.path in folder.duplicates:  # the PACS holds one instance per UID
                entry["same_uid_as"] = folder.duplicates[source.path]
            for d in settings.destinations:
                state = deliveries[d.name][source.key]
                entry["destinations"][d.name] = {
                    "c_store_status": state.last_status,
                    "time": _iso(state.delivered_at),
                    "verified_by_c_find": state.verified_by == "c-find",
                }
                if state.verified_by == "c-store":  # no C-FIND could tell: why
                    entry["destinations"][d.name]["c_store_only"] = state.verify_error
                if state.superseded:  # this PACS had acknowledged other versions of the file
                    entry["destinations"][d.name]["earlier_versions_sent"] = state.superseded
        yield target, entry


def _verification(destination: Destination, verifier: Verifier) -> str:
    if destination.verify == "none":
        return "off (C-STORE answers only)"
    if destination.name in verifier.refused:
        return "not answered by this PACS (C-STORE answers only)"
    return "c-find"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def destination_cells(entry: dict[str, Any], names: list[str]) -> list[str]:
    """One receipt file's answer per destination, as words (one cell if never sent)."""
    if not entry.get("sent"):
        return [f"not sent: {entry.get('why', '')}"]
    cells = []
    for name in names:
        d = entry["destinations"].get(name, {})
        mark = " +C-FIND" if d.get("verified_by_c_find") else ""
        if d.get("earlier_versions_sent"):
            mark += f" (resent x{d['earlier_versions_sent']})"
        cells.append((d.get("c_store_status") or "-") + mark)
    return cells


def render(path: Path) -> str:
    """A receipt as a readable table (for `importer receipt`)."""
    if path.is_dir():
        path = receipt_path(path)
    receipt = json.loads(path.read_text(encoding="utf-8"))
    lines = [f"Receipt {path}",
             f"Folder {receipt['folder']}: PatientID {receipt['patient']['id']},"
             f" PatientName {receipt['patient']['name']}"]
    names = [d["name"] for d in receipt["destinations"]]
    check = receipt.get("identity_check")
    if check:
        lines.append(f"Identity check (RECONCILE={check['policy']}):")
        lines += [f"  {source}: {verdict}" for source, verdict in check["sources"].items()]
        lines += [f"  original identity in {o['files']} files: PatientID {o['patient_id']!r},"
                  f" PatientName {o['patient_name']!r}, born {o['birth_date'] or '?'},"
                  f" sex {o['sex'] or '?'}" for o in check["original_identities"]]
    if release := receipt.get("release"):
        lines.append(f"Released by {release['by']} at {release['released_at']}"
                     f"{' (' + release['reason'] + ')' if release.get('reason') else ''};"
                     f" accepted: {release['accepted']}")
    for d in receipt["destinations"]:
        lines.append(f"  {d['name']}: {d['destination']}"
                     f"{'' if d['required'] else ' (optional)'}, verification {d['verification']}")
    width = max([len(f["path"]) for f in receipt["files"]] + [4])
    lines.append(f"{'file':<{width}}  {'bytes':>10}  " + "  ".join(f"{n:<22}" for n in names))
    for f in receipt["files"]:
        cells = destination_cells(f, names)
        if not f.get("sent"):
            lines.append(f"{f['path']:<{width}}  {f['size']:>10}  {cells[0]}")
            continue
        lines.append(f"{f['path']:<{width}}  {f['size']:>10}  "
                     + "  ".join(f"{c:<22}" for c in cells))
    sent = sum(1 for f in receipt["files"] if f.get("sent"))
    lines.append(f"{sent} files sent, {len(receipt['files']) - sent} archived unsent")
    return "\n".join(lines)
