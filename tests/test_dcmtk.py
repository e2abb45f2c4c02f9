"""The DCMTK executor's dictionary choice: dcmdump and dcmodify start without the private-tag
dictionary (half of each start's CPU), and that changes nothing they read or write, over
pydicom's public samples (private and UN sequences, implicit and big-endian files, every
character set)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_charset_files, get_testdata_files

from importer.dcmtk import runner
from importer.stamp import CHECKED_TAGS
from importer.validate import ORIGINAL_TAGS


def loaded_dictionaries(**kw: bool) -> list[str]:
    probe = runner.run("dcmdump", ["-ll", "debug", "/dev/null"], **kw)
    return [os.path.basename(line.split("Loading file: ")[1]) for line in probe.lines
            if "Loading file: " in line]


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    runner.standard_dictionary.cache_clear()
    yield
    runner.standard_dictionary.cache_clear()


def samples() -> list[Path]:
    files = [Path(f) for f in [*get_testdata_files(), *get_charset_files()]
             if os.path.isfile(f) and f.endswith(".dcm")]
    assert len(files) > 80, "pydicom's bundled files are available offline"
    return files


def test_dcmdump_and_dcmodify_start_without_the_private_dictionary(fresh_probe: None) -> None:
    assert loaded_dictionaries() == ["dicom.dic"]
    assert loaded_dictionaries(full_dictionary=True) == ["dicom.dic", "private.dic"]


def test_a_dictionary_path_set_by_the_site_is_left_whole(
        fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    full = runner.run("dcmdump", ["-ll", "debug", "/dev/null"], full_dictionary=True).lines
    paths = [line.split("Loading file: ")[1] for line in full if "Loading file: " in line]
    monkeypatch.setenv("DCMDICTPATH", ":".join(paths))
    assert loaded_dictionaries() == ["dicom.dic", "private.dic"]


def test_dcmdump_reads_every_public_sample_alike_without_the_private_dictionary() -> None:
    files = [str(f) for f in samples()]
    for tags in (ORIGINAL_TAGS, CHECKED_TAGS):
        args = ["-M", "+F", "+L", "+p", "-Un", *[a for t in tags for a in ("+P", t)], *files]
        full = runner.run("dcmdump", args, full_dictionary=True)
        standard = runner.run("dcmdump", args)
        assert (standard.exit_code, standard.lines) == (full.exit_code, full.lines)


def test_dcmodify_writes_every_public_sample_alike_without_the_private_dictionary(
        tmp_path: Path) -> None:
    """The stamping's own arguments; the only bytes allowed to differ are a SOP Instance UID
    dcmodify makes up for a file that has none (a new one each call, its length too)."""
    args = ["-ie", "-nmu", "-i", "(0010,0020)=12345", "-i", "(0010,0010)=Test^Patient",
            "-i", "(0400,0561)[0].(0400,0550)[0].(0010,0020)=OLD",
            "-i", "(0400,0561)[0].(0400,0565)=COERCE"]
    pairs = []
    for index, sample in enumerate(samples()):
        for side in ("full", "standard"):
            (tmp_path / side).mkdir(exist_ok=True)
            shutil.copyfile(sample, tmp_path / side / f"{index}.dcm")
        pairs.append((tmp_path / "full" / f"{index}.dcm", tmp_path / "standard" / f"{index}.dcm"))
    full = runner.run("dcmodify", [*args, *(str(a) for a, _ in pairs)], full_dictionary=True)
    standard = runner.run("dcmodify", [*args, *(str(b) for _, b in pairs)])
    assert standard.exit_code == full.exit_code
    assert [line.replace("/standard/", "/full/") for line in standard.lines] == full.lines
    for (a, b), sample in zip(pairs, samples(), strict=True):
        if a.read_bytes() == b.read_bytes():
            continue
        dumps = [runner.run("dcmdump", ["+L", "-Un", str(p)], full_dictionary=True).lines
                 for p in (a, b)]
        kept = [[line for line in dump  # the made-up UID, and the length of the group of it
                 if "SOPInstanceUID" not in line and "FileMetaInformationGroupLength" not in line]
                for dump in dumps]
        assert kept[0] == kept[1], sample.name
