"""[PHASE 1.5] What each file of a chunk is, from one full read: an image to stamp and send,
not DICOM (archived unsent), a DICOMDIR, a copy still arriving, or unreadable (quarantined
once it has stayed so for INCOMPLETE_GRACE); and whether a folder holds two patients or
two different images under one SOP Instance UID."""

from __future__ import annotations

import hashlib
import logging
import os

from importer import dcmtk
from importer.config import Settings
from importer.folders import display
from importer.logs import event, warn
from importer.model import Folder, SourceFile
from importer.share import image_without_pixels, read_head, share_time
from importer.snapshot import unchanged
from importer.sniff import DICOMDIR, HEAD_BYTES, kind_of, may_become_dicom, plainly_not_dicom

ORIGINAL_TAGS = (
    dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET, dcmtk.BIRTH_DATE, dcmtk.SEX,
    dcmtk.SOP_INSTANCE_UID, dcmtk.STUDY_INSTANCE_UID, dcmtk.MEDIA_STORAGE_SOP_CLASS,
    dcmtk.TRANSFER_SYNTAX, dcmtk.SOP_CLASS, dcmtk.ROWS, dcmtk.ORIGINAL_ATTRIBUTES,
    *dcmtk.PIXEL_DATA_TAGS,
)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def read_originals(folders: list[Folder], magic: dict[str, bool]) -> dict[str, dcmtk.Dump]:
    """[PHASE 1.5] one full read of the folders' DICOM files, in one dcmdump (per argv
    chunk): a truncated file is caught here."""
    paths = [f.path for folder in folders for f in folder.files]
    dumps = dcmtk.dump_tags([p for p in paths if magic[p]], ORIGINAL_TAGS)
    # Without the preamble and "DICM" a data set is still DICOM if DCMTK reads it, with
    # its SOP Class and Instance UIDs (stamping writes it back as a file with meta header).
    for path, dump in dcmtk.dump_tags([p for p in paths if not magic[p]], ORIGINAL_TAGS).items():
        if not dump.error and _has_sop_uids(dump):
            dumps[path] = dump
    return dumps


def classify(folder: Folder, dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Sort out one folder's non-DICOM files, DICOMDIRs and unreadable files from what
    was read; then the two-patients check on what the files said before stamping.

    A file that looks unfinished (unreadable, no DICM magic yet, an image without its pixel
    data) and changed within INCOMPLETE_GRACE is a copy still under way, not a broken file:
    it is left in place; only once it has stayed unchanged that long is it judged. A file
    that is plainly something else (text, a program, a font, a ZIP: sniff.py) is not one:
    it is archived unsent with the folder at once."""
    folder.files = unchanged(folder, folder.files, "while being read")
    now = share_time(settings.import_dir)  # the share's clock ages its files
    candidates = []
    not_dicom: list[tuple[str, str]] = []  # (rel, what it is)
    for source in folder.files:
        dump = dumps.get(source.path)
        # A file unpacked from a settled archive is complete however new: never "arriving".
        young = (source.path not in folder.members
                 and now - source.ident.changed_at() < settings.incomplete_grace)
        dicomdir = dump is not None and _is_dicomdir(source, dump)
        if dump is None:
            head = read_head(source.path, HEAD_BYTES)
            if young and head is not None and may_become_dicom(head):
                folder.writing[source.path] = (
                    f"incomplete: no DICM magic yet ({source.size} bytes)")
                continue
            what = plainly_not_dicom(head or b"")
            not_dicom.append((source.rel, what or (
                "empty" if head == b"" else "no DICM magic, not a data set")))
            folder.unsent.append(source)
            folder.unsent_kinds[source.path] = kind_of(source.rel, head)
        elif unfinished := _looks_unfinished(dump, dicomdir):
            while_young, once_old = unfinished
            if young:
                folder.writing[source.path] = f"incomplete: {while_young}"
                continue
            folder.to_quarantine[source.path] = once_old
        elif dicomdir:
            folder.unsent.append(source)  # a CD's index, not an image: never sent
            folder.unsent_kinds[source.path] = DICOMDIR
        else:
            source.transfer_syntax = dump.values.get(dcmtk.TRANSFER_SYNTAX, "")
            source.sop_uid = dump.values.get(dcmtk.SOP_INSTANCE_UID, "")
            source.sop_class = dump.values.get(dcmtk.SOP_CLASS, "")
            source.study_uid = dump.values.get(dcmtk.STUDY_INSTANCE_UID, "")
            candidates.append(source)
    folder.files = candidates
    _note_not_dicom(folder, not_dicom)
    _check_patients(folder, dumps, settings)


def _note_not_dicom(folder: Folder, not_dicom: list[tuple[str, str]]) -> None:
    """One [WARN] per folder, not per file (a CD's viewer is hundreds of files); every file
    with what it is in the JSON log."""
    for rel, what in not_dicom:
        event("INFO", "Not a DICOM file: %s/%s (%s; archived with its folder, not sent)",
              display(folder.name), display(rel), what, level=logging.DEBUG)
    if not_dicom:
        rel, what = not_dicom[0]
        n = len(not_dicom) - 1
        more = f" and {n} more file{'s' if n > 1 else ''}" if n else ""
        warn("Not a DICOM file: %s/%s (%s)%s: archived with its folder, not sent",
             display(folder.name), display(rel), what, more)


def _check_patients(folder: Folder, dumps: dict[str, dcmtk.Dump], settings: Settings) -> None:
    """Two people in one folder (two CDs copied together) must never be merged."""
    values = [dumps[f.path].values for f in folder.files]
    births = {v.get(dcmtk.BIRTH_DATE) for v in values} - {None, ""}
    sexes = {v.get(dcmtk.SEX) for v in values} - {None, ""}
    ids = {v.get(dcmtk.PATIENT_ID) for v in values} - {None, ""}
    if len(births) > 1 or len(sexes) > 1:
        what = (f"birth dates {sorted(births)}" if len(births) > 1 else "") + (
            f" sexes {sorted(sexes)}" if len(sexes) > 1 else "")
        message = f"files disagree on {what.strip()}: this folder may hold two patients"
        if settings.mixed_patients == "hold":
            folder.held = message
            warn("%s: %s; held, nothing stamped or sent (MIXED_PATIENTS=hold)",
                 display(folder.name), message)
        elif settings.mixed_patients == "warn":
            warn("%s: %s; sending anyway (MIXED_PATIENTS=warn)", display(folder.name), message)
    elif len(ids) > 1:
        warn("%s: files carry %d different original patient IDs; birth date and sex agree,"
             " so they are stamped as one patient", display(folder.name), len(ids))


def check_duplicate_uids(folder: Folder, settings: Settings) -> None:
    """Files that share a SOP Instance UID: the PACS holds one instance per UID. The same
    image twice (a CD copied twice) is fine; different content under one UID is named, and
    archived (the PACS kept one of them) or quarantined (DUPLICATE_UIDS=quarantine)."""
    by_uid: dict[str, list[SourceFile]] = {}
    for source in folder.ready:
        if source.sop_uid:
            by_uid.setdefault(source.sop_uid, []).append(source)
    for uid, same in by_uid.items():
        if len(same) < 2:
            continue
        digests = {f.path: _digest(f.path) for f in same}
        first = same[0]
        differing = [f for f in same[1:] if digests[f.path] != digests[first.path]]
        for f in same[1:]:
            folder.duplicates[f.path] = first.rel
        if not differing:
            continue
        names = ", ".join(display(f.rel) for f in differing)
        if settings.duplicate_uids == "quarantine":
            for f in differing:
                folder.to_quarantine[f.path] = (
                    f"same SOP Instance UID {uid} as {first.rel} with different content: a PACS"
                    " keeps one instance per UID (DUPLICATE_UIDS=quarantine)")
            folder.ready = [f for f in folder.ready if f.path not in folder.to_quarantine]
        warn("%s: %s carry the SOP Instance UID of %s with different content; a PACS keeps"
             " one of them (%s)", display(folder.name), names, display(first.rel),
             "quarantined" if settings.duplicate_uids == "quarantine" else "sent and archived")


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _has_sop_uids(dump: dcmtk.Dump) -> bool:
    """What a C-STORE needs of a data set: its SOP Class and Instance UIDs."""
    return bool(dump.values.get(dcmtk.SOP_CLASS) and dump.values.get(dcmtk.SOP_INSTANCE_UID))


def _is_dicomdir(source: SourceFile, dump: dcmtk.Dump) -> bool:
    return (dump.values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS) == DICOMDIR_SOP_CLASS
            or os.path.basename(source.path).upper() == "DICOMDIR")


def _looks_unfinished(dump: dcmtk.Dump, dicomdir: bool) -> tuple[str, str] | None:
    """For a file that looks cut short: why it may still be arriving, and the quarantine
    reason once it has stayed so for INCOMPLETE_GRACE. None: it looks whole."""
    values = dump.values
    if dump.error:
        return (f"DCMTK cannot read it yet ({dump.error})",
                f"DCMTK cannot read this file: {dump.error}")
    sop_class = values.get(dcmtk.SOP_CLASS) or values.get(dcmtk.MEDIA_STORAGE_SOP_CLASS, "")
    if image_without_pixels(values, sop_class, dcmtk.ROWS, dcmtk.PIXEL_DATA_TAGS):
        return ("an image without its pixel data yet",
                "image without pixel data: the header of an image whose pixel data never"
                " arrived (a copy that stopped); get it again from its source")
    if not dicomdir and not _has_sop_uids(dump):
        return ("no SOP Class or Instance UID yet",
                "no SOP Class UID or SOP Instance UID in the data set: a C-STORE cannot carry"
                " it (fix it at its source)")
    return None
