"""The fault campaign's own parts: the generator covers every fault kind and replays, and the
oracle, shown a site where a promise was broken, says so (a checker that cannot fail is none).

The campaign itself runs in `.ci/run` (`make chaos`); its bugs' regression tests live beside
the feature they guard.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from chaos.oracle import check
from chaos.runner import play
from chaos.scenario import FAULTS, Destination, FileSpec, Folder, Scenario, generate

QUIET = Scenario(
    seed=0, mode="watch",
    destinations=(Destination("primary", "storescp"), Destination("backup", "refusing")),
    folders=(Folder("#4711-Doe^Jane", "4711", "Doe^Jane", "2.25.900",
                    (FileSpec("IM1.dcm", "ct", "2.25.901", 1),
                     FileSpec("SER2/IM2.dcm", "ct", "2.25.902", 2),
                     FileSpec("notes.txt", "text")), (), arrive=0.0),
             Folder("#12 34-Doe^John", "", "", "2.25.910",
                    (FileSpec("IM1.dcm", "ct", "2.25.911", 1),), ("hostile-name",), arrive=0.0)),
    events=(), length=2.0)


def test_a_seed_is_its_scenario_and_the_generator_injects_every_kind() -> None:
    assert generate(41) == generate(41)
    assert generate(41).timeline() == generate(41).timeline()
    assert generate(41) != generate(42)
    seen: dict[str, int] = {}
    for seed in range(1, 301):
        for kind, n in generate(seed).faults().items():
            seen[kind] = seen.get(kind, 0) + n
    never = [k for kinds in FAULTS.values() for k in kinds if seen.get(k, 0) < 20]
    assert not never, f"injected fewer than 20 times in 300 scenarios: {never}"


def test_the_oracle_passes_a_good_run_and_names_each_broken_promise(tmp_path: Path) -> None:
    run = play(QUIET, tmp_path / "site")
    run.close()
    verdict = check(run)
    assert verdict.violations == [] and verdict.checks > 10
    assert sorted(run.site.archived()) == ["#4711-Doe^Jane/IM1.dcm", "#4711-Doe^Jane/SER2/IM2.dcm",
                                           "#4711-Doe^Jane/notes.txt"]

    # An archived image that vanished: lost.
    archived = run.site.archived()
    moved = tmp_path / "elsewhere.dcm"
    shutil.move(archived["#4711-Doe^Jane/SER2/IM2.dcm"], moved)
    assert any(v.startswith("lost or not archived: '#4711-Doe^Jane'/SER2/IM2.dcm")
               for v in check(run).violations)
    shutil.move(moved, archived["#4711-Doe^Jane/SER2/IM2.dcm"])

    # The PACS holding an instance under another name: wrong identity.
    received = run.receivers["primary"].root / "out"
    first = sorted(received.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.PatientName = "Someone^Else"
    ds.save_as(first)
    assert any(v.startswith("wrong identity at primary") for v in check(run).violations)

    # A half-received instance: partial.
    ds.PatientName = "Doe^Jane"
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(first)
    assert any(v.startswith("partial or foreign instance at primary")
               for v in check(run).violations)

    # A refused name's folder touched: untouched no more.
    (run.site.import_dir / "#12 34-Doe^John" / "IM1.dcm").write_bytes(b"changed")
    assert any(v.startswith("untouched (refused name)") for v in check(run).violations)
