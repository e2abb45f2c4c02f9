"""dcmodify and dcmconv: stamping an identity, character sets, UN, decompression."""

from __future__ import annotations

from collections.abc import Sequence

from importer.dcmtk.runner import ToolRun, chunked, run
from importer.folders import Patient

# --- dcmodify / dcmconv -----------------------------------------------------------------


def stamp_identity(paths: Sequence[str], patient: Patient, *, utf8: bool,
                   backup: bool, provenance: Sequence[str] = ()) -> list[ToolRun]:
    """Insert-or-overwrite PatientID/PatientName (and the UTF-8 character set), and the
    provenance (original_attributes_args) in the same call.

    With backup, dcmodify renames each original to ``<file>.bak`` before writing the new
    file; without (``-nb``) it rewrites in place, so callers must then pass copies, never
    the only original. The exit code and messages are not trusted; callers verify the
    result with dump_tags.
    """
    args = [*([] if backup else ["-nb"]), "-ie", "-nmu", "-i", f"(0010,0020)={patient.id}",
            "-i", f"(0010,0010)={patient.name}", *provenance]
    if utf8:
        args += ["-i", "(0008,0005)=ISO_IR 192"]
    fixed = sum(len(a.encode("utf-8", "surrogateescape")) + 9 for a in args)
    return [run("dcmodify", [*args, *chunk]) for chunk in chunked(paths, fixed)]


def original_attributes_args(item: int, originals: Sequence[tuple[str, str]], when: str,
                             system: str) -> list[str]:
    """dcmodify arguments that add item number `item` (0: a new sequence; n: appended
    after the n items a file has) to the Original Attributes Sequence (0400,0561): the
    original values of the changed attributes ((tag, value): '' for one that was absent)
    in its Modified Attributes Sequence (0400,0550), when, by what, and why (COERCE)."""
    at = f"(0400,0561)[{item}]"
    args = [arg for tag, value in originals
            for arg in ("-i", f"{at}.(0400,0550)[0].({tag})={value}")]
    return [*args, "-i", f"{at}.(0400,0562)={when}", "-i", f"{at}.(0400,0563)={system}",
            "-i", f"{at}.(0400,0565)=COERCE"]


def set_charset(paths: Sequence[str], charset: str) -> list[ToolRun]:
    """Insert-or-overwrite (0008,0005) in place, one call per chunk (``-nb``: copies only).

    Only relabels; the bytes of the text stay as they are. Callers convert right after and
    treat a failed conversion as the verdict, not this call's exit code.
    """
    args = ["-nb", "-ie", "-nmu", "-i", f"(0008,0005)={charset}"]
    fixed = sum(len(a.encode("utf-8", "surrogateescape")) + 9 for a in args)
    return [run("dcmodify", [*args, *chunk]) for chunk in chunked(paths, fixed)]


def convert_to_utf8(source: str, target: str) -> ToolRun:
    """Re-encode every text element of one file to UTF-8 (dcmconv works one file a call)."""
    return run("dcmconv", ["+U8", source, target])


def convert_un(source: str, target: str) -> ToolRun:
    """A copy whose UN elements (of known tags) have their real VR: dcmodify cannot set a
    value in an element it reads as UN."""
    return run("dcmconv", ["+uc", source, target])


# Decompressors for syntaxes a PACS may not accept (storescu 3.6.7 cannot convert them on
# the fly): transfer syntax -> (tool, lossless). JPEG 2000 has no decoder in DCMTK.
_DECOMPRESSORS = {
    "1.2.840.10008.1.2.4.57": ("dcmdjpeg", True), "1.2.840.10008.1.2.4.70": ("dcmdjpeg", True),
    "1.2.840.10008.1.2.4.50": ("dcmdjpeg", False), "1.2.840.10008.1.2.4.51": ("dcmdjpeg", False),
    "1.2.840.10008.1.2.4.80": ("dcmdjpls", True), "1.2.840.10008.1.2.4.81": ("dcmdjpls", False),
    "1.2.840.10008.1.2.5": ("dcmdrle", True),
}


def decompression_tool(transfer_syntax: str) -> tuple[str, bool] | None:
    """The DCMTK tool that decompresses this transfer syntax, and whether losslessly."""
    return _DECOMPRESSORS.get(transfer_syntax)


def decompress(source: str, target: str, transfer_syntax: str) -> ToolRun:
    """A copy of source in Explicit VR Little Endian (the tools' default output)."""
    tool, _lossless = _DECOMPRESSORS[transfer_syntax]
    return run(tool, [source, target])
