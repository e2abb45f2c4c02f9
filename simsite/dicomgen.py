"""Synthetic DICOM test data (pydicom + numpy), so tests and the benchmark need no real patients.

Every file is a valid DICOM Part 10 *CT Image Storage* object in explicit VR little endian with
16-bit pixel data and a private block, so a receiver accepts it and byte-identity checks have
something private to compare. UIDs are random (uuid-based); everything else is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "DICOMGEN TEST"
# The private block's content, for byte-identity checks after stamping/sending.
PRIVATE_TEXT = "dicomgen private value"
PRIVATE_BYTES = bytes(range(256))


@lru_cache(maxsize=8)
def _pixels(rows: int) -> bytes:
    """A rows x rows 12-bit gradient with no zero pixel (cached: identical for every file)."""
    i, j = np.indices((rows, rows), dtype=np.uint32)
    return (((i * 7 + j * 13) % 4095) + 1).astype("<u2").tobytes()


def make_ct(
    path: str | Path,
    *,
    patient_id: str = "OLD1",
    patient_name: str | bytes = "Old^Name",
    rows: int = 128,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    charset: str | None = None,
    birth_date: str | None = None,
    sex: str | None = None,
    omit_patient_tags: bool = False,
    instance_number: int = 1,
    extra: Callable[[Dataset], None] | None = None,
) -> str:
    """Write one CT file to ``path`` (parents created) and return its SOP Instance UID.

    ``charset`` is the value of (0008,0005), e.g. ``"ISO_IR 100"``, ``"ISO_IR 192"`` or
    ``"\\ISO 2022 IR 149"`` (backslash = multi-valued); ``None`` leaves the tag out. A ``str``
    name is encoded with that charset by pydicom; a ``bytes`` name is written verbatim (e.g.
    UTF-8 without (0008,0005), as the old scripts produced). ``omit_patient_tags`` leaves out
    PatientID and PatientName (to test insert-vs-modify). ``extra(ds)`` may tweak the dataset
    last, just before it is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_uid or generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "DICOMGEN_1"

    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    # The character set must be set before any text is assigned: pydicom encodes with it.
    if charset is not None:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomgen"
    ds.ReferringPhysicianName = ""
    if not omit_patient_tags:
        ds.PatientName = patient_name
        ds.PatientID = patient_id
    if birth_date is not None:
        ds.PatientBirthDate = birth_date
    if sex is not None:
        ds.PatientSex = sex
    ds.KVP = "120"
    ds.SliceThickness = "1.0"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = rows
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", PRIVATE_TEXT)
    block.add_new(0x11, "OB", PRIVATE_BYTES)
    ds.PixelData = _pixels(rows)
    ds["PixelData"].VR = "OW"
    if extra is not None:
        extra(ds)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def make_patient_folder(
    root: str | Path,
    folder_name: str,
    n_files: int,
    *,
    rows: int = 128,
    subdirs: int = 0,
    **make_ct_kwargs: object,
) -> list[Path]:
    """Create ``root/folder_name`` holding one study of ``n_files`` CT files; return their paths.

    With ``subdirs=k`` the files are dealt round-robin over k nested directories
    ``folder/d1``, ``folder/d1/d2``, …, ``folder/d1/…/dk`` (to test relative-path
    preservation); with 0 they all lie in the folder itself. Files are named ``IM00001.dcm``…;
    extra keyword arguments go to :func:`make_ct` (study/series UIDs default to one per folder).
    """
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    dirs = [folder]
    if subdirs:
        dirs = []
        d = folder
        for k in range(1, subdirs + 1):
            d = d / f"d{k}"
            dirs.append(d)
    kwargs: dict = dict(make_ct_kwargs)
    kwargs.setdefault("study_uid", generate_uid())
    kwargs.setdefault("series_uid", generate_uid())
    paths = []
    for i in range(n_files):
        p = dirs[i % len(dirs)] / f"IM{i + 1:05d}.dcm"
        make_ct(p, rows=rows, instance_number=i + 1, **kwargs)
        paths.append(p)
    return paths


def make_corpus(
    root: str | Path, folders: int = 6, files_per_folder: int = 100, rows: int = 128
) -> list[Path]:
    """Create ``folders`` ASCII patient folders ``#1001-Doe^John1``, … and return their paths.

    Each file still carries a different "old" identity (``OLD<k>`` / ``Old^Name<k>``), so a
    receiver's copy shows whether the folder's identity was stamped.
    """
    out = []
    for k in range(1, folders + 1):
        name = f"#{1000 + k}-Doe^John{k}"
        make_patient_folder(
            root,
            name,
            files_per_folder,
            rows=rows,
            patient_id=f"OLD{k}",
            patient_name=f"Old^Name{k}",
        )
        out.append(Path(root) / name)
    return out


def truncated_copy(src: str | Path, dst: str | Path, keep_bytes: int) -> Path:
    """Copy the first ``keep_bytes`` bytes of ``src`` to ``dst``: a file cut short mid-transfer."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(keep_bytes))
    return dst


def write_non_dicom(path: str | Path, text: str = "not a DICOM file\n") -> Path:
    """Write a text file (e.g. a stray ``notes.txt``) into a patient folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
