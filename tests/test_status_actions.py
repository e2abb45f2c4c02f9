"""Actions from the status page (issue #24, item 2): a release done through the page makes
the held folder go on at its next run; a quarantined file goes back for import; what a PACS
lost of an archived folder is resent, in the background, and the folder leaves the "missing"
list; every POST without the token, from another origin, or without (or with a spent) CSRF
token is refused and changes nothing; a GET never changes anything; every action and
refusal is recorded."""

from __future__ import annotations

import html
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom

from importer.config import load_settings
from importer.model import folder_hash
from importer.snapshot import folder_lock
from simsite.dicomgen import make_patient_folder
from simsite.receivers import Orthanc, StoreSCP
from simsite.site import Site, wait_for
from tests.test_retention import delete_in_orthanc, orthanc  # noqa: F401 (fixture)
from tests.test_status_page import NO_PROXY, Watching, busy_site, get  # noqa: F401 (fixture)

TOKEN = "s3cret-token"
HELD = "#13-Two^People"


def post(url: str, fields: dict[str, str], headers: dict[str, str]) -> tuple[int, str]:
    data = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def _form(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value
            in re.findall(r'<input type=hidden name="(\w+)" value="([^"]*)">', page)}


def _tampered(token: str) -> str:
    """The token with its last character changed (always changed: not a 1-in-16 no-op)."""
    return token[:-1] + ("1" if token[-1] == "0" else "0")


def _state(site: Site) -> tuple[str, list[str], list[str]]:
    """What a refused action must not change: the held note, the failed dir, the import dir."""
    note = site.state_dir / "held" / f"{folder_hash(HELD)}.txt"
    return note.read_text(), sorted(site.failed()), site.remaining()


def test_release_and_retry_from_the_page_and_every_refusal_changes_nothing(
        busy_site: tuple[Site, StoreSCP]) -> None:  # noqa: F811
    site, _storescp = busy_site
    watching = Watching(site, STATUS_TOKEN=TOKEN, STATUS_ACTIONS="on")
    url = watching.url
    origin = {"Origin": url}
    try:
        wait_for(lambda: (site.log_dir / "log.log").read_text().count("held —") >= 2, 20)
        code, page = get(f"{url}/?token={TOKEN}")
        assert code == 200 and "release…" in page and "retry…" in page
        link = html.unescape(re.search(r'href="(/action\?do=release[^"]+)"', page).group(1))
        assert "Two" not in link  # the folder's hash, not the patient's name, in the URL
        before = _state(site)

        code, confirm = get(url + link)  # the confirmation step: a GET changes nothing
        assert code == 200 and "it goes on at its next run" in confirm and "birth dates" in confirm
        assert _state(site) == before
        form = _form(confirm)
        assert set(form) == {"do", "target", "csrf", "token"}

        refusals = [
            (401, {**form, "token": ""}, origin),  # without the token
            (401, {**form, "token": "wrong"}, origin),
            (403, form, {"Origin": "http://evil.example"}),  # from another origin
            (403, form, {"Referer": "http://evil.example/page"}),
            (403, form, {}),  # neither Origin nor Referer
            (403, {**form, "csrf": ""}, origin),  # without the CSRF token
            (403, {**form, "csrf": _tampered(form["csrf"])}, origin),
            (403, {**form, "do": "retry"}, origin),  # a token issued for another action
        ]
        for expected, fields, headers in refusals:
            code, body = post(url + "/action", fields, headers)
            assert code == expected, (fields, headers, body)
            assert _state(site) == before
        assert get(f"{url}/action?do=release&target={form['target']}")[0] == 401

        code, done = post(url + "/action", form, origin)
        assert code == 200 and "released #13-Two^People" in done
        assert post(url + "/action", form, origin)[0] == 403  # spent: once only
        assert "released by status page (127.0.0.1)" in _state(site)[0]
        wait_for(lambda: any(k.startswith(HELD + "/") for k in site.archived()), 30)

        # retry a quarantined file, through its confirmation page
        code, page = get(f"{url}/?token={TOKEN}")
        link = html.unescape(re.search(r'href="(/action\?do=retry[^"]+)"', page).group(1))
        code, confirm = get(url + link)
        assert code == 200 and "back as" in confirm
        old = next(site.failed_dir.rglob("cut.dcm"))
        code, done = post(url + "/action", _form(confirm), {"Referer": url + link})
        assert code == 200 and "put back for import" in done, done
        assert f"{site.import_dir}/#12-Cut^Short/cut.dcm" in done and not old.exists()

        code, page = get(f"{url}/?token={TOKEN}")
        assert "Actions from this page" in page and "refused: not from this page" in page
    finally:
        output = watching.stop()
    records = [json.loads(line)
               for line in (site.state_dir / "actions.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in records] == [False] * 8 + [True, False, True]
    assert all(r["client"] == "127.0.0.1" and r["at"] for r in records)
    assert "Status page: release" in output


def test_actions_off_by_default_and_need_a_token(busy_site: tuple[Site, StoreSCP],  # noqa: F811
                                                 tmp_path: Path) -> None:
    site, _storescp = busy_site
    refused = site.run("watch", env={**site.env, "STATUS_LISTEN": "127.0.0.1:18089",
                                     "STATUS_ACTIONS": "on"})
    assert refused.returncode == 2 and "STATUS_TOKEN" in refused.stderr
    watching = Watching(site, STATUS_TOKEN=TOKEN)
    try:
        code, page = get(f"{watching.url}/?token={TOKEN}")
        assert code == 200 and "release…" not in page
        target = folder_hash(HELD)
        assert get(f"{watching.url}/action?do=release&target={target}&token={TOKEN}")[0] == 403
        code, _ = post(watching.url + "/action", {"do": "release", "target": target,
                                                  "token": TOKEN}, {"Origin": watching.url})
        assert code == 403
        assert "released by" not in _state(site)[0]
    finally:
        watching.stop()


LOST = "#61-Lost^Again"


def test_resend_from_the_page_puts_the_lost_instance_back(
        site: Site, orthanc: Orthanc) -> None:  # noqa: F811
    """Queued, not run in the request; waits while another batch holds the folder; a second
    request meanwhile is "already under way"; refusals change nothing."""
    site.use(orthanc)
    make_patient_folder(site.import_dir, LOST, 3, rows=16)
    assert site.run().returncode == 0
    (archived,) = [b / LOST for b in site.archive_dir.iterdir() if (b / LOST).is_dir()]
    lost_uid = pydicom.dcmread(sorted(archived.iterdir())[1]).SOPInstanceUID
    delete_in_orthanc(orthanc, lost_uid)
    assert site.run("audit").returncode == 1  # now listed as missing at the PACS
    watching = Watching(site, STATUS_TOKEN=TOKEN, STATUS_ACTIONS="on")
    url, origin = watching.url, {"Origin": watching.url}

    def unchanged() -> None:
        assert orthanc.count_instances() == 2 and site.remaining() == []
        assert json.loads(site.run("status", "--json").stdout)["missing_at_pacs"]

    try:
        code, page = get(f"{url}/?token={TOKEN}")
        assert code == 200 and "resend…" in page
        link = html.unescape(re.search(r'href="(/action\?do=resend[^"]+)"', page).group(1))
        assert "Lost" not in link  # the entry's key, not the patient's name, in the URL
        code, confirm = get(url + link)  # a GET changes nothing
        assert code == 200 and str(archived) in confirm
        assert f"1 instance to ORTHANC@127.0.0.1:{orthanc.port}" in confirm, confirm
        assert "in the background" in confirm
        forms = [_form(get(url + link)[1]) for _ in range(2)]
        unchanged()
        for expected, fields, headers in [
            (401, {**forms[0], "token": ""}, origin),  # without the token
            (403, forms[0], {"Origin": "http://evil.example"}),  # from another origin
            (403, {**forms[0], "csrf": ""}, origin),  # without the CSRF token
            (403, {**forms[0], "do": "release"}, origin),  # a token for another action
        ]:
            code, body = post(url + "/action", fields, headers)
            assert code == expected, (fields, headers, body)
        assert get(f"{url}/action?do=resend&target={forms[0]['target']}")[0] == 401
        unchanged()

        # Another importer's batch holds the folder: the resend is queued and waits for it.
        with folder_lock(load_settings({}, site.env), LOST) as acquired:
            assert acquired
            code, done = post(url + "/action", forms[0], origin)
            assert code == 200 and "queued: resend of" in done, done
            code, body = post(url + "/action", forms[1], origin)
            assert code == 409 and "already under way" in body, body
            assert "already under way" in get(url + link)[1]
            page = get(f"{url}/?token={TOKEN}")[1]
            assert "resend under way" in page and "resend…" not in page
            wait_for(lambda: "waits for the batch" in (site.log_dir / "log.log").read_text(), 10)
            unchanged()

        wait_for(lambda: orthanc.count_instances() == 3, 60)
        (restored,) = [i for i in orthanc.instances()
                       if i["MainDicomTags"]["SOPInstanceUID"] == lost_uid]
        assert orthanc.get(f"/instances/{restored['ID']}/tags?short")["0010,0020"] == "61"
        wait_for(lambda: "ended: exit code 0" in get(f"{url}/?token={TOKEN}")[1], 30)
        page = get(f"{url}/?token={TOKEN}")[1]
        missing = page.split("Archived, missing at a PACS</h2>")[1].split("<h2>")[0]
        assert "none" in missing and "Lost" not in missing and "resend…" not in page
        assert json.loads(site.run("status", "--json").stdout)["missing_at_pacs"] == []
        assert site.remaining() == []
    finally:
        output = watching.stop()
    records = [json.loads(line)
               for line in (site.state_dir / "actions.jsonl").read_text().splitlines()]
    assert [(r["ok"], r["refused"]) for r in records] == (
        [(False, True)] * 4 + [(True, False), (False, True), (True, False)])
    assert "queued" in records[4]["outcome"] and "already under way" in records[5]["outcome"]
    assert "exit code 0: every instance is listed again" in records[6]["outcome"]
    assert "Status page: resend" in output


def test_a_resend_waiting_when_the_importer_stops_is_recorded_as_not_started(
        site: Site) -> None:
    from importer.resend_queue import Job, ResendQueue

    settings = load_settings({}, site.env)
    ended: list[tuple[str, bool, str]] = []
    resends = ResendQueue(settings, lambda job, ok, words: ended.append((job.key, ok, words)))
    job = Job("k" * 20, site.archive_dir / "20260101_000000" / LOST, "127.0.0.1", "now")
    with folder_lock(settings, LOST) as acquired:  # a batch at work on that folder
        assert acquired and resends.submit(job) is None
        assert resends.submit(job) is job  # the same folder again: the one under way
        time.sleep(0.5)  # the worker has taken it and polls for the lock
        resends.stop()
    assert ended == [("k" * 20, False, "not started: the importer stopped first")]
    assert resends.busy() == set() and resends.submit(job) is job  # stopped: nothing new
