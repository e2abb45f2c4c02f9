"""Actions from the status page (issue #24, item 2): a release done through the page makes
the held folder go on at its next run; a quarantined file goes back for import; every POST
without the token, from another origin, or without (or with a spent) CSRF token is refused
and changes nothing; a GET never changes anything; every action and refusal is recorded."""

from __future__ import annotations

import html
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from importer.model import folder_hash
from tests.conftest import Site
from tests.receivers import StoreSCP
from tests.test_status_page import NO_PROXY, Watching, busy_site, get  # noqa: F401 (fixture)
from tests.test_watch import wait_for

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
            (403, {**form, "csrf": form["csrf"][:-2] + "00"}, origin),
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
