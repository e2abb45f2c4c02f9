"""Is it the right patient? (issue 20) The folder's identity against what the site knows.

Real parts: Orthanc seeded with patients by C-STORE and answering C-FIND; Orthanc as Debian
ships it (no C-FIND for unknown AEs); storescp; DCMTK's wlmscpfs as a Modality Worklist.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from importer import names
from importer.reconcile import Known, Person, judge
from simsite.dicomgen import make_ct, make_patient_folder
from simsite.receivers import Orthanc, StoreSCP, _port_open, free_port
from simsite.site import Site
from tests.test_verify import receipt_of

# --- names, as people read them (pure) ---------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [
    ("Hong^Gil-Dong", "HONG^GILDONG"), ("Hong Gildong", "HONG^GILDONG"),
    ("GILDONG^HONG", "Hong^Gildong"), ("hong^gil.dong", "HONG^GIL DONG"),
    ("Hong^Gildong=洪^吉洞=홍^길동", "홍길동"), ("Müller^Hans", "MÜLLER^HANS"),
    ("ＨＯＮＧ^ＧＩＬＤＯＮＧ", "Hong^Gildong"),  # full-width letters (NFKC)
])
def test_names_that_name_the_same_person_match(a: str, b: str) -> None:
    assert names.match(a, b) is True
    assert names.match(b, a) is True


@pytest.mark.parametrize(("a", "b", "verdict"), [
    ("Hong^Gildong", "KIM^CHULSOO", False),
    ("홍길동", "김철수", False),
    ("HONG^GILDONG", "홍길동", None),  # no script in common: not compared
    ("Hong^Gildong=^=^", "홍^길동", None),  # Orthanc's Latin-1 answer loses the groups
    ("", "KIM", None),
])
def test_other_names_differ_or_are_not_compared(a: str, b: str, verdict: bool | None) -> None:
    assert names.match(a, b) is verdict


@pytest.mark.parametrize(("folder", "there", "verdict"), [
    ("Ōta^Hanako", "ta^Hanako", True),  # Orthanc's Latin-1 answer drops what it cannot spell
    ("Łukasz^Kowalski", "?ukasz^Kowalski", True),  # or a PACS writes '?'
    ("Dvořák^Antonín", "Dvorák^Antonín", False),  # another letter is another name
    ("Ōta^Hanako", "Sato^Hanako", False),
    ("Müller^Hans", "Mller^Hans", False),  # ü is Latin-1: it would have arrived whole
])
def test_a_name_the_pacs_character_set_could_not_hold_whole(folder: str, there: str,
                                                           verdict: bool) -> None:
    """Found by the fault campaign (chaos seed 204): a folder half sent to Orthanc held
    itself on its next run, its own name answered back in Latin-1 without the 'Ō'."""
    assert names.match(folder, there) is verdict


def _judge(known: dict[str, Known], originals: list[Person], folder_name: str = "Hong^Gildong",
           elsewhere: dict[str, dict[str, str]] | None = None):
    return judge(folder_name, originals, known, elsewhere or {}, lambda n: n)


def test_judge_says_what_differs_on_each_side() -> None:
    kim = Person("KIM^CHULSOO", "19500101", "M")
    verdict = _judge({"PACS": Known([kim])}, [Person("CD^NAME", "19800505", "F")])
    (conflict,) = verdict.conflicts
    assert "KIM^CHULSOO" in conflict and "Hong^Gildong" in conflict
    assert "19800505" in conflict and "19500101" in conflict
    assert "sex (files F; there M)" in conflict
    # The right person: the CD's own ID and name do not count, birth date and sex do.
    assert not _judge({"PACS": Known([Person("HONG^GILDONG", "19800505", "F")])},
                      [Person("OTHER^HOSPITAL", "19800505", "F")]).conflicts


def test_judge_new_patient_partial_dates_other_scripts_and_unchecked() -> None:
    verdict = _judge({"A": Known([]), "B": Known(unchecked="down"),
                      "C": Known([Person("홍길동", "1980", "O")])},
                     [Person("X", "19800505", "F")])
    assert not verdict.conflicts
    assert verdict.per_source["A"].startswith("new patient")
    assert verdict.unchecked == ["B"]
    assert "names not compared" in verdict.per_source["C"]  # and 1980 / O are not compared


def test_judge_holds_when_the_pacs_disagrees_with_itself_or_files_the_study_elsewhere() -> None:
    two = Known([Person("HONG^GILDONG", "19800505", "F"), Person("HONG^GILDONG", "19810101", "F")])
    (conflict,) = _judge({"P": two}, [Person("", "19800505", "F")]).conflicts
    assert "its own studies under this ID disagree" in conflict
    (conflict,) = _judge({"P": Known([])}, [], elsewhere={"P": {"1.2.3": "999"}}).conflicts
    assert "study 1.2.3 is filed there under PatientID '999'" in conflict


# --- against real receivers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    """A PACS that answers C-FIND (as simsite.receivers configures Orthanc by default)."""
    with Orthanc(tcp_nodelay=True) as server:
        yield server


def seed(orthanc: Orthanc, tmp: Path, patient_id: str, name: str, birth: str, sex: str,
         study_uid: str | None = None) -> str:
    """What the site already knows: one instance stored in the PACS; its study UID."""
    path = tmp / f"seed-{patient_id}-{hashlib.sha1(name.encode()).hexdigest()[:6]}.dcm"
    make_ct(path, patient_id=patient_id, patient_name=name, birth_date=birth, sex=sex,
            study_uid=study_uid, charset="ISO_IR 192" if not name.isascii() else None)
    subprocess.run(["storescu", "-aec", orthanc.aet, orthanc.host, str(orthanc.port), str(path)],
                   check=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def instances_of(orthanc: Orthanc, patient_id: str) -> list[dict]:
    """The instances the PACS files under this PatientID."""
    return [i for p in orthanc.patients() if p["MainDicomTags"].get("PatientID") == patient_id
            for i in orthanc.get(f"/patients/{p['ID']}/instances")]


def stored_file(orthanc: Orthanc, instance_id: str, tmp: Path) -> pydicom.Dataset:
    req = orthanc.url + f"/instances/{instance_id}/file"
    out = tmp / f"{instance_id}.dcm"
    with orthanc._opener.open(req, timeout=30) as resp:
        out.write_bytes(resp.read())
    return pydicom.dcmread(out)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def use_orthanc(site: Site, orthanc: Orthanc) -> None:
    site.env |= {"PACS_SERVER_IP": orthanc.host, "PACS_SERVER_PORT": str(orthanc.port),
                 "PACS_AET": orthanc.aet, "VERIFY_DELAY": "0"}


def test_mistyped_id_is_held_untouched_and_the_pacs_patient_gets_nothing(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "12345", "KIM^CHULSOO", "19500101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#12345-Hong^Gildong", 3, patient_id="CD-0042",
                        patient_name="HONG^GILDONG", birth_date="19800505", sex="F")
    folder = site.import_dir / "#12345-Hong^Gildong"
    before = digests(folder)

    result = site.run()

    assert result.returncode == 1, result.stdout + result.stderr
    assert digests(folder) == before  # untouched: not even stamped
    assert len(instances_of(orthanc, "12345")) == 1  # the man's record got nothing
    assert site.archived() == {}
    (line,) = [w for w in result.stderr.splitlines()
               if "[WARN]" in w and "does not match what the site knows" in w]
    for what in ("KIM^CHULSOO", "Hong^Gildong", "19800505", "19500101", "sex (files F; there M)",
                 "importer release"):
        assert what in line, line
    status = json.loads(site.run("status", "--json").stdout)
    (held,) = status["held"]
    assert held["folder"] == "#12345-Hong^Gildong" and "KIM^CHULSOO" in held["reason"]

    # The operator is sure (the same person, re-registered): release, and it goes.
    released = site.run("release", "#12345-Hong^Gildong", "--reason", "checked with the ward")
    assert released.returncode == 0, released.stderr
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances_of(orthanc, "12345")) == 4
    receipt = receipt_of(site, "#12345-Hong^Gildong")
    assert receipt["release"]["reason"] == "checked with the ward"
    assert "KIM^CHULSOO" in receipt["release"]["accepted"]
    assert receipt["identity_check"]["original_identities"][0]["patient_id"] == "CD-0042"
    table = site.run("receipt", str(next(site.archive_dir.glob("*/#12345-Hong^Gildong"))))
    assert "Released by" in table.stdout and "checked with the ward" in table.stdout


def test_right_id_is_sent_with_the_original_identity_inside(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20001", "KIM^CHULSOO", "19500101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20001-Kim^Chulsoo", 2, patient_id="OUTSIDE-7",
                        patient_name="KIM^CHULSOO", birth_date="19500101", sex="M")

    result = site.run()

    assert result.returncode == 0, result.stdout + result.stderr
    stored = instances_of(orthanc, "20001")
    assert len(stored) == 3, result.stderr
    mine = [stored_file(orthanc, i["ID"], tmp_path) for i in stored]
    mine = [ds for ds in mine if "OriginalAttributesSequence" in ds]
    assert len(mine) == 2
    for ds in mine:
        (item,) = ds.OriginalAttributesSequence
        (modified,) = item.ModifiedAttributesSequence
        assert modified.PatientID == "OUTSIDE-7"
        assert str(modified.PatientName) == "KIM^CHULSOO"
        assert item.ReasonForTheAttributeModification == "COERCE"
        assert item.ModifyingSystem.startswith("dicom-importer")
        assert len(item.AttributeModificationDateTime) >= 14
        assert ds.PatientID == "20001" and str(ds.PatientName) == "Kim^Chulsoo"
    receipt = receipt_of(site, "#20001-Kim^Chulsoo")
    (verdict,) = receipt["identity_check"]["sources"].values()
    assert verdict == "matches the patient there"


def test_new_id_is_sent_and_the_receipt_says_new_patient(site: Site, orthanc: Orthanc) -> None:
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20002-New^Person", 2, birth_date="19990909", sex="F")
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances_of(orthanc, "20002")) == 2
    receipt = receipt_of(site, "#20002-New^Person")
    assert list(receipt["identity_check"]["sources"].values())[0].startswith("new patient")


def test_a_folder_sent_in_two_runs_is_not_held_by_its_own_name_in_latin_1(
        site: Site, orthanc: Orthanc) -> None:
    """Chaos seed 204: the rest of a folder whose first files reached Orthanc (which answers
    C-FIND in Latin-1 and drops the letters it cannot represent) was held on the next run."""
    use_orthanc(site, orthanc)
    folder = site.import_dir / "#20010-Ōta^Hanako"
    make_patient_folder(site.import_dir, folder.name, 2, birth_date="19800505", sex="F")
    assert site.run().returncode == 0
    later = make_patient_folder(site.import_dir, folder.name, 1, birth_date="19800505", sex="F")
    later[0].rename(folder / "IM00099.dcm")
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances_of(orthanc, "20010")) == 3
    assert site.remaining() == []


def test_name_only_conflict_is_held(site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20003", "PARK^JIMIN", "19700101", "F")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20003-Choi^Minsu", 2, birth_date="19700101", sex="F")
    result = site.run()
    assert result.returncode == 1
    assert len(instances_of(orthanc, "20003")) == 1
    assert "name (folder Choi^Minsu; there PARK^JIMIN)" in result.stderr


def test_same_name_in_another_script_is_sent_saying_not_compared(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20004", "HONG^GILDONG", "19800505", "F")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20004-홍길동", 2, birth_date="19800505", sex="F")
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances_of(orthanc, "20004")) == 3
    receipt = receipt_of(site, "#20004-홍길동")
    (verdict,) = receipt["identity_check"]["sources"].values()
    assert "names not compared" in verdict


def test_a_study_the_pacs_files_under_another_id_is_held_before_sending(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    study = seed(orthanc, tmp_path, "20005", "LEE^MINHO", "19600101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20006-Lee^Minho", 2, study_uid=study,
                        birth_date="19600101", sex="M")
    result = site.run()
    assert result.returncode == 1
    assert instances_of(orthanc, "20006") == []
    assert f"study {study} is filed there under PatientID '20005'" in result.stderr


def test_release_lapses_when_files_change_and_a_renamed_folder_is_checked_afresh(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20007", "KIM^CHULSOO", "19500101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20007-Hong^Gildong", 2, birth_date="19800505", sex="F")
    assert site.run().returncode == 1
    assert site.run("release", "#20007-Hong^Gildong").returncode == 0
    make_ct(site.import_dir / "#20007-Hong^Gildong" / "late.dcm", birth_date="19800505", sex="F")
    result = site.run()
    assert result.returncode == 1
    assert "release of" in result.stderr and "lapsed" in result.stderr
    assert len(instances_of(orthanc, "20007")) == 1

    # The radiographer finds the typo: renamed to the right (new) ID, checked afresh, sent.
    (site.import_dir / "#20007-Hong^Gildong").rename(site.import_dir / "#20070-Hong^Gildong")
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(instances_of(orthanc, "20070")) == 3
    assert site.run("release", "#20070-Hong^Gildong").returncode == 2  # nothing held there


def test_a_file_with_an_original_attributes_sequence_gets_a_second_item(
        site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    use_orthanc(site, orthanc)

    def earlier_import(ds: Dataset) -> None:
        modified = Dataset()
        modified.PatientID = "FIRST-ID"
        item = Dataset()
        item.ModifiedAttributesSequence = Sequence([modified])
        item.ModifyingSystem = "another PACS"
        item.ReasonForTheAttributeModification = "COERCE"
        ds.OriginalAttributesSequence = Sequence([item])

    path = site.import_dir / "#20008-Cd^Again" / "im.dcm"
    make_ct(path, patient_id="SECOND-ID", patient_name="Cd^Again", extra=earlier_import)
    original = pydicom.dcmread(path)
    assert site.run().returncode == 0
    (instance,) = instances_of(orthanc, "20008")
    ds = stored_file(orthanc, instance["ID"], tmp_path)
    first, second = ds.OriginalAttributesSequence
    assert first.ModifiedAttributesSequence[0].PatientID == "FIRST-ID"
    assert second.ModifiedAttributesSequence[0].PatientID == "SECOND-ID"
    assert "PatientName" not in second.ModifiedAttributesSequence[0]  # it did not change
    # Nothing else changed.
    for element in original:
        if element.tag not in (0x00100020, 0x04000561):
            assert ds[element.tag] == element, element.keyword


def test_orthanc_as_debian_ships_it_is_not_checked_and_required_holds(
        site: Site, tmp_path: Path) -> None:
    config = {"DicomAlwaysAllowFind": False, "DicomModalities": {}}
    with Orthanc(tcp_nodelay=True, config=config) as debian:
        use_orthanc(site, debian)
        make_patient_folder(site.import_dir, "#20009-Not^Checked", 2)
        folder = site.import_dir / "#20009-Not^Checked"
        before = digests(folder)
        result = site.run(env=site.env | {"RECONCILE": "required"})
        assert result.returncode == 1
        assert digests(folder) == before and debian.count_instances() == 0
        assert "the patient identity is not checked there either" in result.stderr
        assert "RECONCILE=required" in result.stderr

        result = site.run()  # the default: said once, and it goes on
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.count("answers no C-FIND") == 1  # one line for both checks
        assert "the patient identity is not checked there either" in result.stderr
        assert debian.count_instances() == 2
        receipt = receipt_of(site, "#20009-Not^Checked")
        (verdict,) = receipt["identity_check"]["sources"].values()
        assert verdict.startswith("not checked: it answers no C-FIND")


def test_reconcile_off_sends_as_before(site: Site, orthanc: Orthanc, tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20010", "KIM^CHULSOO", "19500101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20010-Hong^Gildong", 1, birth_date="19800505", sex="F")
    result = site.run(env=site.env | {"RECONCILE": "warn"})
    assert result.returncode == 0
    assert "sending anyway (RECONCILE=warn)" in result.stderr
    make_patient_folder(site.import_dir, "#20010-Park^Other", 1, birth_date="19810505", sex="F")
    assert site.run(env=site.env | {"RECONCILE": "off"}).returncode == 0


# One scheduled procedure step, in the shape of DCMTK's example wlistdb/OFFIS/wklist1.dump
# (wlmscpfs ignores an entry without these attributes).
WORKLIST_ENTRY = """(0008,0050) SH  00000
(0008,0005) CS  [ISO_IR 100]
(0010,0010) PN  PARK^SEOYEON
(0010,0020) LO  30001
(0010,0030) DA  19900101
(0010,0040) CS  F
(0020,000d) UI  1.2.276.0.7230010.3.2.101
(0032,1032) PN  SMITH
(0032,1060) LO  EXAM6
(0040,0100) SQ
(fffe,e000) -
(0008,0060) CS  CT
(0040,0001) AE  CT1
(0040,0002) DA  20261202
(0040,0003) TM  085607
(0040,0006) PN  JOHNSON
(0040,0007) LO  EXAM74
(0040,0009) SH  SPD3445
(0040,0010) SH  STN456
(0040,0011) SH  B34F56
(0040,0012) LO
(0040,0400) LT
(fffe,e00d) -
(fffe,e0dd) -
(0040,1001) SH  RP454G234
(0040,1003) SH  LOW
"""


@pytest.fixture
def worklist(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """DCMTK's wlmscpfs serving one scheduled patient: 30001, PARK^SEOYEON, 1990-01-01, F."""
    if shutil.which("wlmscpfs") is None:
        pytest.skip("wlmscpfs not installed")
    db = tmp_path / "wlistdb" / "WLM"
    db.mkdir(parents=True)
    (db / "lockfile").touch()
    (tmp_path / "wl.dump").write_text(WORKLIST_ENTRY, encoding="latin-1")
    subprocess.run(["dump2dcm", str(tmp_path / "wl.dump"), str(db / "wl1.wl")], check=True)
    port = free_port()
    proc = subprocess.Popen(["wlmscpfs", "-dfp", str(db.parent), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield "WLM", port
    finally:
        proc.terminate()
        proc.wait()


def test_worklist_is_a_second_source(site: Site, storescp: StoreSCP,
                                     worklist: tuple[str, int]) -> None:
    aet, port = worklist
    site.use(storescp)
    site.env["RECONCILE_WORKLIST"] = f"{aet}@127.0.0.1:{port}"
    make_patient_folder(site.import_dir, "#30001-Park^Seoyeon", 2, birth_date="19900202", sex="F")
    result = site.run()
    assert result.returncode == 1
    assert storescp.received() == []
    assert "birth date (files 19900202; there 19900101)" in result.stderr
    shutil.rmtree(site.import_dir / "#30001-Park^Seoyeon")
    make_patient_folder(site.import_dir, "#30001-Seoyeon^Park", 2, birth_date="19900101", sex="F")
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(storescp.received()) == 2


def test_names_stay_out_of_logs_status_and_receipts(site: Site, orthanc: Orthanc,
                                                    tmp_path: Path) -> None:
    seed(orthanc, tmp_path, "20011", "KIMSECRET^CHULSOO", "19500101", "M")
    seed(orthanc, tmp_path, "20012", "PARKSECRET^JIMIN", "19700101", "F")
    use_orthanc(site, orthanc)
    site.env["LOG_PATIENT_NAMES"] = "false"
    make_patient_folder(site.import_dir, "#20011-Hongsecret^Gildong", 1, birth_date="19800505",
                        sex="F", patient_name="CDSECRET^ONE")
    make_patient_folder(site.import_dir, "#20012-Parksecret^Jimin", 1, birth_date="19700101",
                        sex="F", patient_name="CDSECRET^TWO")
    result = site.run()
    assert result.returncode == 1  # one held, one sent
    status = site.run("status", "--json").stdout
    receipt = next(site.archive_dir.glob("*/*.receipt.json")).read_text()
    logs = (site.log_dir / "log.log").read_text()
    for text in (result.stderr, logs):
        for secret in ("KIMSECRET", "PARKSECRET", "Parksecret", "Hongsecret", "CDSECRET"):
            assert secret not in text, (secret, text[:2000])
    for text in (status, receipt):  # these name folders (as before); no other name shows
        for secret in ("KIMSECRET", "PARKSECRET", "CDSECRET"):
            assert secret not in text, (secret, text[:2000])
    assert "***" in result.stderr


def test_watch_holds_once_and_goes_on_when_released(site: Site, orthanc: Orthanc,
                                                    tmp_path: Path) -> None:
    from simsite.site import Watching, wait_for

    seed(orthanc, tmp_path, "20013", "KIM^CHULSOO", "19500101", "M")
    use_orthanc(site, orthanc)
    make_patient_folder(site.import_dir, "#20013-Hong^Gildong", 2, birth_date="19800505", sex="F")
    watcher = Watching(site)
    try:
        log = site.log_dir / "log.log"
        wait_for(lambda: "held, nothing stamped or sent" in log.read_text(), 20)
        # Activity that changes nothing: no second announcement after the quiet period.
        scratch = site.import_dir / "#20013-Hong^Gildong" / "tmp.part"
        scratch.write_bytes(b"x")
        scratch.unlink()
        time.sleep(4)
        assert log.read_text().count("held, nothing stamped or sent") == 1
        assert len(instances_of(orthanc, "20013")) == 1

        released_at = time.monotonic()
        assert site.run("release", "#20013-Hong^Gildong").returncode == 0
        wait_for(lambda: len(instances_of(orthanc, "20013")) == 3, 20)
        assert time.monotonic() - released_at < 10  # not the 30 s heartbeat: inotify
        wait_for(lambda: site.remaining() == [], 10)
    finally:
        watcher.stop()
    assert "was released: processing it" in watcher.output


# --- the importer's own record: whose each study is ---------------------------------------------


def test_a_study_sent_under_one_id_holds_a_folder_of_it_under_another(
        site: Site, storescp: StoreSCP) -> None:
    """Found by the fault campaign (chaos seeds 51, 74, 201, 212): the same images in the
    folders of two patients, and a PACS that answers no C-FIND (storescp), so cannot say
    the study is filed elsewhere. Both went, and one image was filed under both people.
    Now the second folder is held, untouched, naming the first."""
    site.use(storescp)
    make_patient_folder(site.import_dir, "#30001-Park^Jisoo", 2)
    assert site.run().returncode == 0
    # The same CD, dropped again under another patient's ID (a wrong digit).
    again = site.import_dir / "#30007-Park^Jisoo"
    again.mkdir()
    archived = sorted(site.archived().values())
    for path in archived:
        shutil.copy(path, again / path.name)
    before = digests(again)

    result = site.run()

    assert result.returncode == 1, result.stdout + result.stderr
    assert digests(again) == before  # not stamped, not sent
    assert {ds.PatientID for ds in storescp.received_datasets()} == {"30001"}
    study = pydicom.dcmread(archived[0], stop_before_pixels=True).StudyInstanceUID
    (line,) = [w for w in result.stderr.splitlines() if "[WARN]" in w and "held" in w]
    assert (f"study {study} was sent by this importer under PatientID '30001'"
            " (folder #30001-Park^Jisoo" in line), line
    held = json.loads(site.run("status", "--json").stdout)["held"]
    assert [h["folder"] for h in held] == ["#30007-Park^Jisoo"]


def test_two_folders_of_one_study_under_two_ids_in_one_batch_send_only_the_first(
        site: Site, storescp: StoreSCP) -> None:
    site.use(storescp)
    files = make_patient_folder(site.import_dir, "#30011-Han^Sora", 2)
    twin = site.import_dir / "#30017-Han^Sora"
    twin.mkdir()
    for path in files:
        shutil.copy(path, twin / path.name)

    result = site.run()

    assert result.returncode == 1, result.stdout + result.stderr
    held = json.loads(site.run("status", "--json").stdout)["held"]
    (held_folder,) = [h["folder"] for h in held]
    sent_id = ({"#30011-Han^Sora", "#30017-Han^Sora"} - {held_folder}).pop()[1:6]
    assert {ds.PatientID for ds in storescp.received_datasets()} == {sent_id}
    assert "is also in folder" in held[0]["reason"]


def test_the_same_study_twice_under_one_id_is_not_held(site: Site, storescp: StoreSCP) -> None:
    """A CD copied twice for the same patient (a second folder, the name spelt otherwise)."""
    site.use(storescp)
    files = make_patient_folder(site.import_dir, "#30021-Yoon^Mina", 2)
    assert site.run().returncode == 0
    again = site.import_dir / "#30021-YOON^MINA"
    again.mkdir()
    shutil.copy(next(iter(site.archived().values())), again / files[0].name)
    result = site.run()
    assert result.returncode == 0, result.stdout + result.stderr
