"""A scenario from a seed: a small site (destinations, mode) and a timeline of data and faults.

Pure: `generate(seed)` is the same scenario on every machine, so a seed printed by a failing
campaign replays it (`make chaos SEED=…`). A scenario is data only; `runner.py` plays it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field

TIMELINE = 16.0  # seconds of faults; then every fault stops and the importer runs to quiescence

# Every kind of fault the generator injects, by side (the report counts them).
FAULTS: dict[str, tuple[str, ...]] = {
    "data": ("mixed-patients", "duplicate-uid", "compressed", "public-sample", "non-dicom",
             "hostile-name", "known-other-identity", "nested-series", "truncated"),
    "share": ("slow-writer", "stall-open", "stall-closed", "replace", "rename", "delete",
              "add-during-run"),
    "pacs": ("down", "refuse-association", "abort", "stall-dimse", "refuse-file",
             "refuse-transient", "ack-and-lose", "index-late", "wrong-find"),
    "importer": ("sigkill", "syscall-enospc", "syscall-eio", "two-importers", "clock-jump"),
}

# pydicom's public test files, grouped by patient (a folder holds one group: one person).
SAMPLE_GROUPS = (
    ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
     "MR_small_jpeg_ls_lossless.dcm"),  # one SOP Instance UID in five transfer syntaxes
    ("CT_small.dcm",),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_small_odd.dcm"),
    ("rtdose.dcm", "rtdose_rle.dcm"),
    ("rtplan.dcm",),
    ("test-SR.dcm",),
)
COMPRESSED = {"MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm",
              "SC_rgb_jpeg_gdcm.dcm", "rtdose_rle.dcm"}
NAMES = ("Doe^John", "Müller^Jürgen", "Hong^Gildong", "홍^길동", "Núñez^José", "Smith^Anna^B",
         "Kowalski^Jan", "Ōta^Hanako", "Dupont=Dupont^Marie")
# Folder names the pattern must refuse: left in place, untouched, never sent, never run.
HOSTILE = ("#12 34-Doe^John", "#55-Doe$(touch PWNED)", '#56-Doe";touch PWNED;"', "#57-New\nLine",
           os.fsdecode(b"#58-Caf\xe9"), "#-NoId", "scan from ward 3", "#59-`touch PWNED`")


@dataclass(frozen=True)
class FileSpec:
    rel: str  # path inside the folder
    source: str  # "ct" (synthetic), "sample:<name>", "text", "pdf", "truncated"
    sop_uid: str = ""
    instance: int = 0
    birth_date: str = ""
    sex: str = ""
    rows: int = 32


@dataclass(frozen=True)
class Folder:
    name: str
    patient_id: str  # "" for a name the pattern refuses
    patient_name: str
    study_uid: str
    files: tuple[FileSpec, ...]
    kinds: tuple[str, ...]  # the data faults it carries
    arrive: float
    slow: bool = False

    @property
    def held(self) -> bool:
        return "mixed-patients" in self.kinds or "known-other-identity" in self.kinds

    @property
    def matched(self) -> bool:
        return bool(self.patient_id)


@dataclass(frozen=True)
class Destination:
    name: str  # primary, backup (required, from the environment), research (TOML, optional)
    # storescp, orthanc (answers C-FIND), orthanc-debian (answers none), refusing, forgetful
    kind: str
    required: bool = True
    refuse: tuple[str, ...] = ()  # refusing: SOP UIDs answered 0xC000 every time
    transient: tuple[str, ...] = ()  # refusing: SOP UIDs answered 0xA700 twice, then taken
    drop: tuple[int, ...] = ()  # forgetful: instance numbers acknowledged and lost
    refile: tuple[int, ...] = ()  # forgetful: instance numbers listed under another PatientID
    index_delay: float = 0.0  # forgetful: seconds before what it kept is listed


@dataclass(frozen=True)
class Event:
    at: float
    kind: str  # a fault kind of FAULTS, or "up"/"normal"/"release"/"restart"/"arrive"
    target: str = ""  # a destination, a folder, "watch"
    arg: str = ""
    until: float = 0.0  # end of a window (down, refusing, a stalled writer, strace)


@dataclass(frozen=True)
class Scenario:
    seed: int
    mode: str  # watch or run-once
    destinations: tuple[Destination, ...]
    folders: tuple[Folder, ...]
    events: tuple[Event, ...]
    preload: tuple[tuple[str, str], ...] = ()  # (PatientID, name) the C-FIND PACS already holds
    length: float = TIMELINE  # seconds of faults
    dropped: tuple[int, ...] = field(default=())  # event indexes removed by shrinking

    def faults(self) -> dict[str, int]:
        """Fault kind -> how many times this scenario injects it."""
        counts: dict[str, int] = {}
        for f in self.folders:
            for k in f.kinds:
                counts[k] = counts.get(k, 0) + 1
        for d in self.destinations:
            for k, n in (("refuse-file", len(d.refuse)), ("refuse-transient", len(d.transient)),
                         ("ack-and-lose", len(d.drop)), ("wrong-find", len(d.refile)),
                         ("index-late", int(d.index_delay > 0))):
                if n:
                    counts[k] = counts.get(k, 0) + n
        for e in self.events:
            if any(e.kind in kinds for kinds in FAULTS.values()):
                counts[e.kind] = counts.get(e.kind, 0) + 1
        return counts

    def without(self, index: int) -> Scenario:
        """The same scenario minus one event (for shrinking)."""
        events = self.events[:index] + self.events[index + 1:]
        return dataclasses.replace(self, events=events, dropped=(*self.dropped, index))

    def timeline(self) -> str:
        lines = [f"seed {self.seed}: {self.mode}; destinations "
                 + ", ".join(f"{d.name}={d.kind}{'' if d.required else ' (optional)'}"
                             for d in self.destinations)]
        for d in self.destinations:
            extra = {k: v for k, v in dataclasses.asdict(d).items()
                     if k in ("refuse", "transient", "drop", "refile", "index_delay") and v}
            if extra:
                lines.append(f"  {d.name}: {json.dumps(extra)}")
        for f in self.folders:
            lines.append(f"  t={f.arrive:5.1f} folder {f.name!r}: {len(f.files)} files "
                         f"{list(f.kinds)}{' slowly' if f.slow else ''}")
        for e in self.events:
            window = f"..{e.until:.1f}" if e.until else ""
            lines.append(f"  t={e.at:5.1f}{window} {e.kind} {e.target!r} {e.arg}".rstrip())
        return "\n".join(lines)


def generate(seed: int) -> Scenario:
    rng = random.Random(seed)
    uid = lambda: f"2.25.{rng.getrandbits(96)}"  # noqa: E731
    mode = rng.choice(("watch", "watch", "run-once"))
    destinations = _destinations(rng)
    finder = next((d.name for d in destinations if d.kind == "orthanc" and d.required), "")
    folders: list[Folder] = []
    preload: list[tuple[str, str]] = []
    for i in range(rng.randint(3, 6)):
        kinds = _data_kinds(rng, bool(finder))
        pid = f"{rng.randint(1, 99999)}{i}"
        name = rng.choice(NAMES)
        if "hostile-name" in kinds:
            unused = [h for h in HOSTILE if h not in {f.name for f in folders}]
            folder_name, pid, name = rng.choice(unused), "", ""
        else:
            folder_name = f"#{pid}-{name}"
        if "known-other-identity" in kinds:
            preload.append((pid, "Other^Person"))
        files = _files(rng, kinds, uid)
        folders.append(Folder(folder_name, pid, name, uid(), tuple(files), tuple(kinds),
                              arrive=round(rng.uniform(0, 10), 1), slow=rng.random() < 0.25))
    if any("slow-writer" not in f.kinds and f.slow for f in folders):
        folders = [dataclasses.replace(f, kinds=(*f.kinds, "slow-writer")) if f.slow else f
                   for f in folders]
    images = [s.sop_uid for f in folders if f.matched and not f.held
              for s in f.files if s.source == "ct"]
    destinations = [dataclasses.replace(  # the refusing PACS refuses some of this data
        d, refuse=tuple(rng.sample(images, min(len(images), rng.randint(0, 2)))),
        transient=tuple(rng.sample(images, min(len(images), rng.randint(0, 2)))))
        if d.kind == "refusing" else d for d in destinations]
    events = _share_events(rng, folders, uid) + _pacs_events(rng, destinations, finder)
    events += _importer_events(rng, mode) + _clock_events(random.Random(f"clock-{seed}"))
    return Scenario(seed, mode, destinations, tuple(folders),
                    tuple(sorted(events, key=lambda e: e.at)), tuple(preload))


def _destinations(rng: random.Random) -> list[Destination]:
    kinds = ["storescp", "orthanc", "orthanc-debian", "refusing", "forgetful"]
    chosen = rng.sample(kinds, 2)
    if rng.random() < 0.3:
        chosen.append(rng.choice(["storescp", "refusing"]))
    result = []
    for name, kind in zip(("primary", "backup", "research"), chosen, strict=False):
        d = Destination(name, kind, required=name != "research")
        if kind == "forgetful":
            d = dataclasses.replace(
                d, drop=tuple(rng.sample(range(1, 6), rng.randint(0, 1))),
                refile=tuple(rng.sample(range(6, 9), rng.randint(0, 1))),
                index_delay=round(rng.choice((0.0, 0.0, rng.uniform(0.3, 2.5))), 1))
        result.append(d)
    return result


def _data_kinds(rng: random.Random, finder: bool) -> list[str]:
    roll = rng.random()
    if roll < 0.10:
        return ["hostile-name"]
    if roll < 0.18:
        return ["mixed-patients"]
    if roll < 0.26 and finder:
        return ["known-other-identity"]
    kinds = []
    if rng.random() < 0.3:
        kinds.append("public-sample")
    for kind, p in (("duplicate-uid", 0.2), ("nested-series", 0.25), ("non-dicom", 0.2),
                    ("truncated", 0.1)):
        if rng.random() < p:
            kinds.append(kind)
    return kinds


def _files(rng: random.Random, kinds: list[str], uid: object) -> list[FileSpec]:
    assert callable(uid)
    dirs = [""] if "nested-series" not in kinds else ["", "SER1/", "SER1/SUB/", "SER2/"]
    birth, sex = rng.choice((("19800505", "F"), ("", ""), ("19620101", "M")))
    if "public-sample" in kinds:  # the sample's own patient is the folder's only one
        birth, sex = "", ""
    files = []
    for i in range(rng.randint(1, 8)):
        if "mixed-patients" in kinds:
            birth, sex = (("19800505", "F"), ("19620101", "M"))[i % 2]
        if "known-other-identity" in kinds:
            birth, sex = "19800505", "F"
        files.append(FileSpec(f"{rng.choice(dirs)}IM{i + 1:05d}.dcm", "ct", uid(), i + 1,
                              birth, sex, rows=rng.choice((16, 32, 64))))
    if "mixed-patients" in kinds and len(files) < 2:
        files.append(FileSpec("IM00099.dcm", "ct", uid(), 99, "19620101", "M"))
    if "public-sample" in kinds:
        group = rng.choice(SAMPLE_GROUPS)
        for name in rng.sample(group, rng.randint(1, len(group))):
            files.append(FileSpec(f"{rng.choice(dirs)}{name}", f"sample:{name}"))
            if name in COMPRESSED and "compressed" not in kinds:
                kinds.append("compressed")
    if "duplicate-uid" in kinds:
        first = files[0]
        files.append(dataclasses.replace(first, rel=f"copy/{first.rel}"))  # a CD copied twice
        if rng.random() < 0.5:  # the same UID exported again with other content
            files.append(dataclasses.replace(first, rel=f"again/{first.rel}", rows=first.rows * 2))
    if "non-dicom" in kinds:
        files.append(FileSpec("notes.txt", "text"))
        if rng.random() < 0.5:
            files.append(FileSpec("report.pdf", "pdf"))
    if "truncated" in kinds:
        files.append(FileSpec("IM_cut.dcm", "truncated", uid(), 98, birth, sex))
    return files


def _share_events(rng: random.Random, folders: list[Folder], uid: object) -> list[Event]:
    assert callable(uid)
    events = []
    for f in folders:
        if f.held or not f.matched:
            continue
        images = [s for s in f.files if s.source == "ct"]
        stalled = ""
        if images and rng.random() < 0.25:
            kind = rng.choice(("stall-open", "stall-closed"))
            stalled = rng.choice(images).rel
            events.append(Event(f.arrive, kind, f.name, stalled,
                                until=round(f.arrive + rng.uniform(1.5, 6), 1)))
        others = [s for s in images if s.rel != stalled]  # a writer owns its file until done
        if others and rng.random() < 0.2:
            events.append(Event(round(f.arrive + rng.uniform(0.5, 8), 1), "replace", f.name,
                                rng.choice(others).rel + rng.choice(("", "|new-version"))))
        if rng.random() < 0.2:
            events.append(Event(round(f.arrive + rng.uniform(1, 10), 1), "add-during-run",
                                f.name, f"{rng.randint(1, 3)}|{uid()}"))
        roll = 1.0 if stalled else rng.random()  # nobody renames a folder a copy is filling
        if roll < 0.07:
            events.append(Event(round(f.arrive + rng.uniform(0.5, 8), 1), "delete", f.name))
        elif roll < 0.14:
            new_id = f"{rng.randint(1, 99999)}9"
            events.append(Event(round(f.arrive + rng.uniform(0.5, 8), 1), "rename", f.name,
                                f"#{new_id}-{rng.choice(NAMES)}"))
    return events


def _pacs_events(rng: random.Random, destinations: list[Destination], finder: str) -> list[Event]:
    events = []
    for d in destinations:
        if d.name == finder:  # it must answer C-FIND when a known patient's folder is checked
            continue
        kinds = ["down"] + (["refuse-association", "abort", "stall-dimse"]
                            if d.kind == "storescp" else [])
        t = rng.uniform(0, 4)
        while t < TIMELINE - 3 and rng.random() < 0.55:
            length = rng.uniform(2, 7)
            events.append(Event(round(t, 1), rng.choice(kinds), d.name,
                                until=round(min(t + length, TIMELINE), 1)))
            t += length + rng.uniform(1, 5)
    return events


def _importer_events(rng: random.Random, mode: str) -> list[Event]:
    events = []
    for _ in range(rng.choice((0, 1, 1, 2))):
        events.append(Event(round(rng.uniform(1, TIMELINE - 1), 1), "sigkill", mode,
                            until=0.0, arg=f"{rng.uniform(0.2, 2):.1f}"))
    if mode == "watch" and rng.random() < 0.3:
        call = rng.choice(("rename", "fsync", "renameat2"))
        kind = rng.choice(("syscall-enospc", "syscall-eio"))
        events.append(Event(0.0, kind, "watch", f"{call}|{rng.randint(2, 40)}|{rng.randint(2, 9)}",
                            until=round(rng.uniform(6, TIMELINE), 1)))
    if rng.random() < 0.3:
        events.append(Event(round(rng.uniform(2, TIMELINE - 2), 1), "two-importers", "run-once"))
    return events


# How far the importer's wall clock steps (seconds): an NTP correction, a NAS whose clock ran
# ahead, a container started before its host's clock was set. Its monotonic clock and the
# kernel's file times do not move (see clockjump.c).
CLOCK_STEPS = (-86400.0, -3600.0, -600.0, -30.0, -2.0, 2.0, 30.0, 600.0, 3600.0, 86400.0)


def _clock_events(rng: random.Random) -> list[Event]:
    """The importer's clock jumping, drawn from a generator of its own: every scenario that
    has none is the same as before the kind existed (the seeds of earlier campaigns hold)."""
    if rng.random() >= 0.15:
        return []
    steps = rng.sample(CLOCK_STEPS, rng.choice((1, 1, 2)))
    offset, events = 0.0, []
    for step in steps:
        offset += step
        events.append(Event(round(rng.uniform(0.5, TIMELINE - 1), 1), "clock-jump", "importer",
                            f"{offset:g}"))
    return sorted(events, key=lambda e: e.at)
