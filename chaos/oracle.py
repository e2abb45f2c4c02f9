"""The product's promises, checked after a scenario against what every place says.

Whatever happened on the timeline, once the faults stop and the importer is quiet:

1. nothing lost: the last version of every file the share held is in the archive, or
   quarantined with a reason file, or still in the import dir because its folder is held or
   its name is refused (or the person deleted it); compared by content;
2. nothing partial at any PACS: every instance a PACS holds is a complete version's instance;
3. no wrong identity: every instance carries the PatientID and PatientName of a folder that
   held it; nothing of a held or refused folder was sent, and those stay byte for byte;
4. the archive tells the truth: every archived image is held by every required PACS under
   its folder's PatientID, and its receipt lists it with each required PACS's answer;
5. each file's verdict is the one the README gives for its faults (a file a required PACS
   refuses or loses is quarantined, every other is archived);
6. liveness: quiet within `LIVENESS` seconds of the faults stopping;
7. no traceback in any log or output; exit codes as the README says; no command ran.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from chaos.runner import LIVENESS, Run, held_folders
from chaos.share import Version, signature

EXIT_CODES = {0, 1, 3, -9}  # run-once's codes, and SIGKILL (ours)
FINDERS = {"orthanc", "forgetful"}  # the receivers that answer our C-FIND


@dataclass
class Verdict:
    checks: int = 0
    violations: list[str] = field(default_factory=list)

    def expect(self, condition: bool, message: str) -> None:
        self.checks += 1
        if not condition:
            self.violations.append(message)


@dataclass(frozen=True)
class Place:
    where: str  # archive, failed, import
    batch: str  # the <yyyymmdd_hhmmss> directory ("" in the import dir)
    folder: str
    rel: str
    path: Path


def check(run: Run) -> Verdict:
    v = Verdict()
    if run.errors:
        v.violations.extend(f"campaign: {e}" for e in run.errors)
        return v
    places = _places(run)
    found: dict[tuple[str, str], list[Place]] = {}
    for p in places:
        found.setdefault((p.folder, p.rel), []).append(p)
    holdings = {name: r.holdings() for name, r in run.receivers.items()}
    required = [r for r in run.receivers.values() if r.destination.required]
    # What a PACS that answers C-FIND lists is checked against the folder's PatientID; of one
    # that answers none, the README promises only that it acknowledged (and so holds) it.
    listed = {r.destination.name: r.listed() for r in required if r.kind in FINDERS}
    held_uids = {r.destination.name: {h.sop_uid for h in holdings[r.destination.name]}
                 for r in required}
    versions_by_uid: dict[str, list[Version]] = {}
    for versions in run.truth.versions.values():
        for ver in versions:
            if ver.dicom:
                versions_by_uid.setdefault(ver.sop_uid, []).append(ver)
    folders = run.scenario.folders
    held = held_folders(run)
    identities = {}  # SOP UID -> the identities its folders had
    for (index, _), versions in run.truth.versions.items():
        for name in run.truth.names[index]:
            for ver in versions:
                identities.setdefault(ver.sop_uid, set()).add(_identity(name))

    # 1, 3, 5: every file's last version, where the README says it goes.
    for (index, rel), versions in sorted(run.truth.versions.items()):
        folder, last = folders[index], versions[-1]
        names = run.truth.names[index]
        at = [p for name in names for p in found.get((name, rel), [])]
        label = f"{names[-1]!r}/{rel}"
        if not folder.matched or folder.held:
            why = "held" if folder.held else "refused name"
            v.expect([p.where for p in at] == ["import"] and _same_bytes(at[0].path, last),
                     f"untouched ({why}): {label} should stay in the import dir as it was; "
                     f"found {[p.where for p in at]}")
            for ver in versions:
                v.expect(not any(h.sop_uid == ver.sop_uid for hs in holdings.values()
                                 for h in hs),
                         f"sent from a {why} folder: {label} is at a PACS")
            continue
        matches = [p for p in at if _matches(p, last)]
        if index in run.truth.deleted:  # the person deleted the folder: what went, went whole
            v.expect(all(any(_matches(p, ver) for ver in versions) for p in at),
                     f"deleted folder: {label} is somewhere as no version the share held")
            continue
        if any(p.where == "import" for p in at) and run.truth.stays(index):
            v.expect(names[-1] in held, f"left behind: {label} stays in the "
                     "import dir and the log does not say its folder is held")
            continue
        fate = _expected_fate(run, last)
        if last.dicom and len({i for i, _ in identities.get(last.sop_uid, set())}) > 1:
            # One instance in the folders of two patients: the folder that comes second is
            # held (the importer remembers whose each study is), or quarantined where a PACS
            # lists it under the other ID.
            v.expect(any(p.where in ("archive", "failed") for p in matches)
                     or (any(p.where == "import" for p in at) and names[-1] in held),
                     f"lost: {label} (an instance two patients' folders hold) found "
                     f"{[(p.where, p.folder) for p in at]}")
            continue
        if fate == "failed":
            ok = any(p.where == "failed" and _reason(p.path).exists() for p in matches)
            v.expect(ok, f"verdict: {label} should be quarantined with a reason "
                         f"(refused or lost by a required PACS, or incomplete); found "
                         f"{[p.where for p in at]}")
        else:
            v.expect(any(p.where == "archive" for p in matches),
                     f"lost or not archived: {label} ({'DICOM' if last.dicom else 'not DICOM'})"
                     f" found {[(p.where, p.folder) for p in at]}, matching {len(matches)}")
        v.expect(not any(p.where == "import" for p in at),
                 f"left behind: {label} is still in the import dir")

    # 2, 3: what every PACS holds is complete and carries its folder's identity.
    for name, held in holdings.items():
        for h in held:
            if h.sop_uid in run.truth.preloaded:
                continue
            vers = versions_by_uid.get(h.sop_uid, [])
            v.expect(bool(vers), f"unknown instance at {name}: {h.sop_uid}")
            # The same pixels, or a whole decoded image (sent decompressed, or converted
            # from big endian by storescu): a part of one is neither.
            complete = any(ver.complete and (ver.pixels == h.pixels or (
                h.pixel_length == h.expected_length > 0)) for ver in vers)
            v.expect(complete, f"partial or foreign instance at {name}: {h.sop_uid} "
                               f"({h.pixel_length} bytes of pixel data)")
            v.expect((h.patient_id, h.patient_name) in identities.get(h.sop_uid, set()),
                     f"wrong identity at {name}: {h.sop_uid} as {h.patient_id!r} "
                     f"{h.patient_name!r}; its folders: {sorted(identities.get(h.sop_uid, []))}")

    # 4: the archive tells the truth, and the receipts agree.
    receipts = _receipts(run)
    for p in places:
        if p.where != "archive":
            continue
        sig = signature(p.path)
        entry = receipts.get((p.batch, p.folder), {}).get(p.rel)
        v.expect(entry is not None, f"receipt: {p.folder!r}/{p.rel} archived but not listed")
        if not sig.dicom or entry is None or entry.get("sent") is False:
            continue
        pid = _identity(p.folder)[0]
        for dest, uids in held_uids.items():
            v.expect(sig.sop_uid in uids,
                     f"archive untruthful: {p.folder!r}/{p.rel} archived but not held by {dest}")
        for dest, holds in listed.items():
            v.expect(holds.get(sig.sop_uid) == pid,
                     f"archive untruthful: {p.folder!r}/{p.rel} archived but {dest} lists "
                     f"{holds.get(sig.sop_uid)!r} for it, not {pid!r}")
            answer = entry.get("destinations", {}).get(dest, {})
            v.expect(answer.get("time") is not None,
                     f"receipt: {p.folder!r}/{p.rel} has no answer from {dest}: {answer}")

    v.expect(not run.writer_failures, "a file was moved or removed while a writer was still "
             f"writing it (its writer failed): {run.writer_failures}")

    # 6, 7: liveness, logs, exit codes, no command run from a name.
    v.expect(run.quiescent_after is not None,
             f"liveness: not quiet {LIVENESS:.0f} s after the faults stopped; still in the "
             f"import dir: {[p.rel for p in places if p.where == 'import'][:8]}")
    for what, out in run.outputs + [("log.log", run.site.log_dir / "log.log")]:
        text = out.read_text(errors="replace") if out.exists() else ""
        v.expect("Traceback" not in text, f"traceback in {what} ({out}):\n"
                 + text[text.find("Traceback"):][:1500])
    for what, code in run.exit_codes:
        allowed = {0, 143, -15} if what.startswith("watch") else EXIT_CODES
        v.expect(code in allowed, f"exit code {code} from {what}")
    if run.scenario.mode == "run-once" and not held and not any(
            f.held or not f.matched for f in folders):
        v.expect(run.final_exit == 0, f"run-once after quiescence exited {run.final_exit}, not 0")
    pwned = list(run.site.root.rglob("PWNED")) + list(Path.cwd().glob("PWNED"))
    v.expect(not pwned, f"a folder name ran a command: {pwned}")
    return v


def _identity(folder_name: str) -> tuple[str, str]:
    """The PatientID and PatientName a folder name gives (the default FOLDER_PATTERN)."""
    pid, _, name = folder_name[1:].partition("-")
    return pid, name


def _expected_fate(run: Run, last: Version) -> str:
    if not last.complete:
        return "failed"
    if not last.dicom:
        return "archive"
    for d in run.scenario.destinations:
        if not d.required:
            continue
        if last.sop_uid in d.refuse:
            return "failed"
        if d.kind == "forgetful" and (last.instance in d.drop or last.instance in d.refile):
            return "failed"
    return "archive"


def _matches(place: Place, version: Version) -> bool:
    """Is the file at `place` this version (stamped or not: same image, same pixels)?"""
    if not version.dicom:
        return _same_bytes(place.path, version)
    sig = signature(place.path)
    if not version.complete:
        return _same_bytes(place.path, version) or sig.sop_uid == version.sop_uid
    return sig.sop_uid == version.sop_uid and sig.pixels == version.pixels


def _same_bytes(path: Path, version: Version) -> bool:
    return hashlib.sha256(path.read_bytes()).hexdigest() == version.sha256


def _reason(path: Path) -> Path:
    return path.with_name(path.name + ".reason.txt")


def _places(run: Run) -> list[Place]:
    site = run.site
    places = []
    for where, top in (("archive", site.archive_dir), ("failed", site.failed_dir)):
        for path in sorted(top.glob("*/*/**/*")) if top.exists() else []:
            if path.is_file() and not path.name.endswith(".reason.txt"):
                parts = path.relative_to(top).parts
                places.append(Place(where, parts[0], parts[1], "/".join(parts[2:]), path))
    for rel in site.remaining():
        folder, _, inner = rel.partition("/")
        places.append(Place("import", "", folder, inner, site.import_dir / rel))
    return places


def _receipts(run: Run) -> dict[tuple[str, str], dict[str, dict]]:
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for receipt in run.site.archive_dir.glob("*/*.receipt.json"):
        data = json.loads(receipt.read_text(encoding="utf-8"))
        out[(receipt.parent.name, data["folder"])] = {e["path"]: e for e in data["files"]}
    return out
