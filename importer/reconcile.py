"""Is it the right patient? Before anything is stamped, ask what the site already knows.

The folder name is typed by a person: one wrong digit files a woman's CD in a man's record.
IHE's Import Reconciliation Workflow is the model: get the local demographics (each
required PACS by C-FIND, optionally a Modality Worklist), compare them with the folder's
name and with the birth date and sex its files carry, and hold the folder on a conflict,
untouched and unsent, for a person to decide (`importer release`). The comparison is
`judge`, a pure function; `Reconciler` only asks, a batch of patient IDs per findscu.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from importer import dcmtk, names
from importer.claims import OWN_RECORD, Claims
from importer.config import Destination, Settings
from importer.dcmtk.find import Query, decode_value, find_many
from importer.folders import display
from importer.journal import Journal
from importer.logs import MASK, event, warn
from importer.model import Folder

PATIENT_ID, PATIENT_NAME = dcmtk.PATIENT_ID, dcmtk.PATIENT_NAME
BIRTH_DATE, SEX, STUDY_UID = dcmtk.BIRTH_DATE, dcmtk.SEX, dcmtk.STUDY_INSTANCE_UID
# Queries per findscu: one association for many patients (a day of radiographs is 300).
QUERIES_PER_CALL = 50
CALLS_IN_FLIGHT = 2  # per source


@dataclass(frozen=True)
class Person:
    """What one record says of a person: name (PN), birth date (DA), sex (CS)."""

    name: str = ""
    birth_date: str = ""
    sex: str = ""


@dataclass
class Known:
    """What one source holds under one PatientID; unchecked says why it could not tell."""

    records: list[Person] = field(default_factory=list)
    unchecked: str | None = None


@dataclass
class Judgement:
    conflicts: list[str] = field(default_factory=list)  # each: what differs, both sides
    per_source: dict[str, str] = field(default_factory=dict)  # label -> verdict in words
    unchecked: list[str] = field(default_factory=list)  # labels it could not be checked at


def judge(patient_name: str, originals: Iterable[Person], known: dict[str, Known],
          elsewhere: dict[str, dict[str, str]], show: Callable[[str], str]) -> Judgement:
    """Compare a folder's identity with what each source knows.

    patient_name: the folder's; originals: what its files say (their birth date and sex
    are the person's; their PatientID is another hospital's number); known: source label ->
    its records under the folder's PatientID; elsewhere: source label -> study UID -> the
    other PatientID it files one of the folder's studies under; show masks names in text.
    """
    originals = list(originals)
    births = sorted({p.birth_date for p in originals if _full_date(p.birth_date)})
    sexes = sorted({p.sex for p in originals if p.sex in ("M", "F")})
    result = Judgement()
    for label, answer in known.items():
        if answer.unchecked is not None:
            result.per_source[label] = f"not checked: {answer.unchecked}"
            result.unchecked.append(label)
            continue
        found: list[str] = []
        notes: list[str] = []
        if not answer.records:
            result.per_source[label] = "new patient (the ID is unknown there)"
        else:
            found += _disagreement(answer.records, show)
            there_births = sorted({r.birth_date for r in answer.records
                                   if _full_date(r.birth_date)})
            there_sexes = sorted({r.sex for r in answer.records if r.sex in ("M", "F")})
            if births and there_births and set(births) != set(there_births):
                found.append(f"birth date (files {', '.join(births)}; there"
                             f" {', '.join(there_births)})")
            if sexes and there_sexes and set(sexes) != set(there_sexes):
                found.append(f"sex (files {', '.join(sexes)}; there {', '.join(there_sexes)})")
            there_names = sorted({r.name for r in answer.records if r.name})
            verdicts = [names.match(patient_name, n) for n in there_names]
            if there_names and all(v is None for v in verdicts):
                notes.append(f"names not compared: no script in common (folder"
                             f" {show(patient_name)}; there {', '.join(map(show, there_names))})")
            elif any(v is False for v in verdicts) and not any(verdicts):
                found.append(f"name (folder {show(patient_name)}; there"
                             f" {', '.join(map(show, there_names))})")
        for study, other_id in sorted(elsewhere.get(label, {}).items()):
            found.append(f"study {study} is filed there under PatientID {other_id!r}")
        if found:
            result.conflicts.append(f"{label}: " + "; ".join(found))
            result.per_source[label] = "conflict: " + "; ".join(found)
        elif answer.records:
            result.per_source[label] = "; ".join(["matches the patient there", *notes])
    return result


def _disagreement(records: list[Person], show: Callable[[str], str]) -> list[str]:
    """The source's own studies under one ID name different people: say so (and hold)."""
    births = sorted({r.birth_date for r in records if _full_date(r.birth_date)})
    sexes = sorted({r.sex for r in records if r.sex in ("M", "F")})
    there = sorted({r.name for r in records if r.name})
    clash = [(a, b) for i, a in enumerate(there) for b in there[i + 1:]
             if names.match(a, b) is False]
    what = []
    if len(births) > 1:
        what.append(f"birth dates {', '.join(births)}")
    if len(sexes) > 1:
        what.append(f"sexes {', '.join(sexes)}")
    if clash:
        what.append(f"names {', '.join(map(show, there))}")
    return [f"its own studies under this ID disagree ({'; '.join(what)})"] if what else []


def _full_date(value: str) -> bool:
    return len(value) == 8 and value.isdigit()


class Reconciler:
    """Asks each required destination (and RECONCILE_WORKLIST) what it holds under the
    batch's patient IDs: many IDs per findscu, a few calls in flight, begun as soon as the
    folders are listed so that the answers arrive while earlier folders are worked on."""

    def __init__(self, settings: Settings,
                 on_refused: Callable[[Destination, str, str], None] | None = None,
                 down: dict[str, str] | None = None, journal: Journal | None = None) -> None:
        self.settings = settings
        self.claims = Claims(journal)  # whose each study is, by what this importer sent
        self.down = down or {}  # known to be down (watch): not asked
        self.on_refused = on_refused  # tells the verifier: spares it a probe per study
        self.sources = [d for d in settings.destinations if d.required]
        if settings.reconcile_worklist is not None:
            self.sources.append(settings.reconcile_worklist)
        self.pool = ThreadPoolExecutor(max_workers=max(1, CALLS_IN_FLIGHT * len(self.sources)),
                                       thread_name_prefix="reconcile")
        self.asked: dict[tuple[str, str], tuple[Future[list[Known]], int]] = {}
        self.failed: dict[str, str] = {}  # source -> why it gave no answer in this batch
        self.lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def ask(self, patient_ids: Iterable[str]) -> None:
        """Start the queries for these IDs (each source, each ID once per batch)."""
        ids = list(dict.fromkeys(patient_ids))
        for source in self.sources:
            fresh = [i for i in ids if (source.name, i) not in self.asked]
            for start in range(0, len(fresh), QUERIES_PER_CALL):
                group = fresh[start:start + QUERIES_PER_CALL]
                future = self.pool.submit(self._query, source, group)
                for index, patient_id in enumerate(group):
                    self.asked[(source.name, patient_id)] = (future, index)

    def known(self, patient_id: str) -> dict[str, Known]:
        """Source label -> what it holds under this ID (waits for its answer)."""
        self.ask([patient_id])
        found = {}
        for source in self.sources:
            future, index = self.asked[(source.name, patient_id)]
            found[source.label] = future.result()[index]
        return found

    def elsewhere(self, folders: list[Folder]) -> dict[str, dict[str, dict[str, str]]]:
        """Folder name -> source label -> study UID -> the other PatientID a PACS files one
        of the folder's studies under: one query per source for the chunk (a list of UIDs)."""
        studies = {f.study_uid: folder for folder in folders for f in folder.files
                   if f.study_uid}
        found: dict[str, dict[str, dict[str, str]]] = {}
        if not studies:
            return found
        for source in self.sources:
            if (source is self.settings.reconcile_worklist or source.name in self.failed
                    or source.name in self.down):
                continue
            query = Query({STUDY_UID: "\\".join(sorted(studies)), PATIENT_ID: ""})
            batch = find_many(source, "STUDY", [query])
            if batch.error or batch.answers[0].error:
                self._no_answer(source, batch.error or batch.answers[0].error or "", batch.refused)
                continue
            for match in batch.answers[0].matches:
                folder = studies.get(match.get(STUDY_UID, ""))
                other = match.get(PATIENT_ID, "")
                if folder is not None and other and other != folder.patient.id:
                    found.setdefault(folder.name, {}).setdefault(source.label, {})[
                        match[STUDY_UID]] = other
        return found

    def _query(self, source: Destination, patient_ids: list[str]) -> list[Known]:
        if source.name in self.down:
            return [Known(unchecked=f"it is down ({self.down[source.name]})")
                    for _ in patient_ids]
        if why := self.failed.get(source.name):
            return [Known(unchecked=why) for _ in patient_ids]
        worklist = source is self.settings.reconcile_worklist
        keys = {PATIENT_NAME: "", BIRTH_DATE: "", SEX: ""}
        if not worklist:
            keys[STUDY_UID] = ""
        batch = find_many(source, "STUDY", [Query({**keys, PATIENT_ID: i}) for i in patient_ids],
                          worklist=worklist)
        if batch.error and not any(a.matches or not a.error for a in batch.answers):
            why = self._no_answer(source, batch.error, batch.refused)
            return [Known(unchecked=why) for _ in patient_ids]
        _answered(source)
        return [Known(unchecked=a.error) if a.error else
                Known([Person(m.get(PATIENT_NAME, ""), m.get(BIRTH_DATE, ""), m.get(SEX, ""))
                       for m in a.matches if m.get(PATIENT_ID, patient_ids[i]) == patient_ids[i]])
                for i, a in enumerate(batch.answers)]

    def _no_answer(self, source: Destination, error: str, refused: bool) -> str:
        why = (f"it answers no C-FIND from {source.calling_aet} ({error})" if refused
               else f"no answer ({error})")
        with self.lock:
            self.failed.setdefault(source.name, why)
        if refused and self.on_refused is not None and source in self.settings.destinations:
            # One line says what a PACS without C-FIND for us means, for both checks.
            self.on_refused(source, error, f"the patient identity is not checked there either"
                                           f" ({_then(self.settings.reconcile)})")
        else:
            _say_unchecked(source, why, self.settings.reconcile)
        return why


# Each source's "not checked" is said once per process (watch runs for months), again only
# after it has answered in between.
_said: dict[str, str] = {}
_said_lock = threading.Lock()


def _say_unchecked(source: Destination, why: str, policy: str) -> None:
    with _said_lock:
        if source.name in _said:
            return
        _said[source.name] = why
    warn("Patient identity not checked at %s: %s; %s", source.label, why, _then(policy))


def _then(policy: str) -> str:
    return ("folders wait until it answers (RECONCILE=required)" if policy == "required"
            else "folders go on unchecked there")


def _answered(source: Destination) -> None:
    with _said_lock:
        if _said.pop(source.name, None) is not None:
            event("INFO", "Patient identity checked again at %s", source.label)


def originals(folder: Folder, dumps: dict[str, dcmtk.Dump]) -> dict[tuple[str, Person], int]:
    """The distinct original identities the folder's files carry (before stamping): their
    (PatientID, person) and how many files carry each, in one pass over the dumps."""
    counts: dict[tuple[str, Person], int] = {}
    for source in folder.files:
        values = dumps[source.path].values
        key = (values.get(PATIENT_ID, ""),
               Person(decode_value(values.get(PATIENT_NAME, ""), values.get(dcmtk.CHARSET, "")),
                      values.get(BIRTH_DATE, ""), values.get(SEX, "")))
        counts[key] = counts.get(key, 0) + 1
    return counts


def for_receipt(found: dict[tuple[str, Person], int], show_names: bool) -> list[dict[str, Any]]:
    """The receipt's original identities (names masked under LOG_PATIENT_NAMES=false)."""
    return [{"patient_id": patient_id, "patient_name": person.name if show_names else MASK,
             "birth_date": person.birth_date, "sex": person.sex, "files": n}
            for (patient_id, person), n in found.items()]


def reconcile(folders: list[Folder], dumps: dict[str, dcmtk.Dump], settings: Settings,
              reconciler: Reconciler) -> None:
    """Judge each folder of a chunk (not held already): a conflict holds it under
    RECONCILE=hold or required, with one [WARN]; RECONCILE=warn says so and goes on."""
    todo = [f for f in folders if f.files]  # held as two patients too: a release of that
    # hold must not skip this check
    if not todo:
        return
    elsewhere = reconciler.elsewhere(todo)
    show = (lambda n: n) if settings.log_patient_names else (lambda _n: MASK)
    for folder in todo:
        found = originals(folder, dumps)
        judgement = judge(folder.patient.name, {person for _id, person in found},
                          reconciler.known(folder.patient.id), elsewhere.get(folder.name, {}),
                          show)
        if own := reconciler.claims.conflicts(folder):
            judgement.conflicts.append(f"{OWN_RECORD}: " + "; ".join(own))
            judgement.per_source[OWN_RECORD] = "conflict: " + "; ".join(own)
        folder.reconciliation = {
            "policy": settings.reconcile, "sources": judgement.per_source,
            "original_identities": for_receipt(found, settings.log_patient_names)}
        if judgement.conflicts:
            what = (f"the folder's identity (ID {folder.patient.id}) does not match what the"
                    f" site knows: {' | '.join(judgement.conflicts)}")
            if settings.reconcile == "warn":
                warn("%s: %s; sending anyway (RECONCILE=warn)", display(folder.name), what)
            else:
                folder.held = f"{folder.held}; and {what}" if folder.held else what
                warn("%s: %s; held, nothing stamped or sent (RECONCILE=%s): check the ID and"
                     " rename the folder, or accept with `importer release`",
                     display(folder.name), what, settings.reconcile)
        elif judgement.unchecked and settings.reconcile == "required":
            # Nobody needs to decide anything: it waits, untouched, until the source answers.
            why = (f"the patient identity could not be checked at"
                   f" {', '.join(judgement.unchecked)} (RECONCILE=required)")
            folder.pending.update((f.path, why) for f in folder.files)
            folder.files = []
        if not folder.held:
            reconciler.claims.claim(folder)
