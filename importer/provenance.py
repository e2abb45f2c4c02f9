"""Keep the original identity inside each file: an Original Attributes Sequence (0400,0561)
item with the original values of exactly the attributes the stamp changes, written by the
same dcmodify call as the stamp (IHE Import Reconciliation: coerce, and keep the originals).
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Iterable

from importer import dcmtk
from importer.folders import Patient


def provenance(values: dict[str, str], patient: Patient,
                when: str) -> tuple[tuple[str, ...], int]:
    """The dcmodify arguments that keep what the stamp changes of this file (its original
    PatientID and PatientName, only those that differ), and the item count the file's
    Original Attributes Sequence must have afterwards (0: nothing to keep)."""
    originals = [(tag, values.get(tag) or "") for tag, new in
                 ((dcmtk.PATIENT_ID, patient.id), (dcmtk.PATIENT_NAME, patient.name))
                 if values.get(tag) != new]
    if not originals:
        return (), 0
    items = int(values.get(dcmtk.ORIGINAL_ATTRIBUTES) or 0)
    return tuple(dcmtk.original_attributes_args(items, originals, when, modifying_system())), \
        items + 1


@functools.cache
def modifying_system() -> str:
    """Modifying System (0400,0563): this program and its version."""
    try:
        return f"dicom-importer {importlib.metadata.version('dicom-importer')}"
    except importlib.metadata.PackageNotFoundError:
        return "dicom-importer"


def by_provenance(files: Iterable[tuple[str, dict[str, str]]], patient: Patient,
                   when: str) -> tuple[dict[tuple[str, ...], list[str]], dict[str, int]]:
    """Files (path, original values) grouped by the provenance their stamp adds (files with
    the same original identity share one dcmodify), and path -> the item count expected."""
    groups: dict[tuple[str, ...], list[str]] = {}
    expected: dict[str, int] = {}
    for path, values in files:
        args, items = provenance(values, patient, when)
        groups.setdefault(args, []).append(path)
        if items:
            expected[path] = items
    return groups, expected
