"""Working copies for the files that cannot be stamped in place: a character set to convert
to UTF-8 for a non-ASCII name (dcmconv +U8), a Korean label DCMTK does not know, patient
tags encoded as UN (dcmconv +uc). A file that cannot be converted is quarantined with the
reason, never corrupted and never sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from importer import dcmtk
from importer.model import Folder, SourceFile

UTF8_CHARSETS = ("", "ISO_IR 6", "ISO_IR 192")
# Korean in the wild: (0008,0005) says "ISO_IR 149" (or "ISO 2022 IR 149" as value 1), which
# DCMTK refuses. Both name KS X 1001, which DICOM only defines with code extensions, as
# "\ISO 2022 IR 149". A working copy is relabelled so and converted; dcmconv then accepts
# exactly the text that carries the ESC $ ) C designation DICOM requires before Korean in
# every value/component, and fails loudly (the file is quarantined) on plain EUC-KR.
RELABEL_CHARSETS = {"ISO_IR 149": "\\ISO 2022 IR 149", "ISO 2022 IR 149": "\\ISO 2022 IR 149"}


def stage_copies(folder: Folder, to_stamp: list[SourceFile], dumps: dict[str, dcmtk.Dump],
                  work: Path, utf8: bool) -> dict[str, SourceFile]:
    """Copies to stamp (dcmodify -nb rewrites in place; the original must survive a crash).

    For a non-ASCII name, a file in another character set becomes UTF-8 first (dcmconv +U8,
    in parallel); one labelled with a term DCMTK does not know (RELABEL_CHARSETS) is
    relabelled on a copy first. A file that cannot be converted is quarantined, never sent.
    """
    copies: dict[str, SourceFile] = {}
    conversions: list[tuple[SourceFile, str, str, str]] = []  # source, dcmconv input, copy, set
    to_relabel: dict[str, list[str]] = {}  # standard term -> copies to relabel with it
    for index, source in enumerate(to_stamp):
        copy = str(work / f"{index}.dcm")
        charset = dumps[source.path].values.get(dcmtk.CHARSET, "")
        if has_un(dumps[source.path]):
            run = dcmtk.convert_un(source.path, copy)  # then stamped as it is
            if run.exit_code == 0 and os.path.exists(copy):
                copies[copy] = source
            else:
                folder.to_quarantine[source.path] = (
                    f"its patient tags are encoded as UN and dcmconv +uc could not give them"
                    f" their real VR (exit {run.exit_code}: {run.said()})")
            continue
        if not utf8 or charset in UTF8_CHARSETS:
            target = copy  # stamped as it is
        elif charset in RELABEL_CHARSETS:
            target = str(work / f"{index}.relabelled.dcm")
        else:
            conversions.append((source, source.path, copy, charset))
            continue
        try:
            shutil.copyfile(source.path, target)
        except OSError as exc:
            folder.pending[source.path] = f"cannot make a working copy: {exc.strerror}"
            continue
        if target == copy:
            copies[copy] = source
        else:
            to_relabel.setdefault(RELABEL_CHARSETS[charset], []).append(target)
            conversions.append((source, target, copy, charset))
    for standard, paths in to_relabel.items():
        dcmtk.set_charset(paths, standard)  # the conversion below is the verdict
    if not conversions:
        return copies
    converted: dict[str, SourceFile] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = pool.map(lambda c: dcmtk.convert_to_utf8(c[1], c[2]), conversions)
        for (source, given, copy, charset), run in zip(conversions, runs, strict=True):
            if given != source.path:
                with contextlib.suppress(OSError):
                    os.unlink(given)
            if run.exit_code == 0 and os.path.exists(copy):
                converted[copy] = source
                continue
            why = (f"cannot convert character set {charset!r} to UTF-8 for the non-ASCII "
                   f"name (dcmconv +U8 exit {run.exit_code}: {run.said()})")
            if given != source.path:
                why += (f"; DICOM has no {charset!r} (Korean is only defined as a code "
                        f"extension), so it was tried as {RELABEL_CHARSETS[charset]!r}: typically "
                        "its Korean text is plain EUC-KR without the ESC $ ) C escape sequence "
                        "DICOM requires before Korean in each value and name component. Fix "
                        "the file at its source, or import it under an ASCII folder name "
                        "(then its text is sent as it is, in its own character set)")
            folder.to_quarantine[source.path] = why
    # Not the exit code's word: the stamp adds ISO_IR 192 anyway, so check it is dcmconv's.
    for copy, dump in dcmtk.dump_tags(list(converted), (dcmtk.CHARSET,)).items():
        if dump.error or dump.values.get(dcmtk.CHARSET) != "ISO_IR 192":
            folder.to_quarantine[converted[copy].path] = (
                "dcmconv +U8 did not leave a UTF-8 file: "
                + (dump.error or f"SpecificCharacterSet is {dump.values.get(dcmtk.CHARSET)!r}"))
        else:
            copies[copy] = converted[copy]
    return copies


def has_un(dump: dcmtk.Dump) -> bool:
    """Identity or character set encoded as UN (explicit VR, as some anonymisers write)."""
    return not dump.un_tags.isdisjoint((dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME, dcmtk.CHARSET))
