"""The status page as a small control room (issue #24): the picture of the flow, kept as
hourly counters in STATE_DIR, and the page read in a real browser (headless chromium driven
by Selenium) at a phone's width and a desktop's, against a running `importer watch` with a
seeded history. Screenshots go to tests/screenshots/ for a person to look at."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from importer import history
from simsite.dicomgen import make_patient_folder
from simsite.receivers import StoreSCP, free_port
from simsite.site import Site, wait_for
from tests.test_status_page import HOSTILE, Watching, busy_site, get  # noqa: F401 (fixture)

SCREENSHOTS = Path(__file__).parent / "screenshots"
HOSTILE_REASON = "<script>alert(2)</script> & <b>bold</b>"


# --- the counters ----------------------------------------------------------------------------


def test_counts_outages_and_holds_once_and_stays_bounded(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    hour = int(now // 3600)
    ok = {"primary": {"failing_since": None}}
    history.add(tmp_path, history.Finished("#1-A", {"primary": 3}), ok, now)
    history.add(tmp_path, history.Finished("#2-B", {"primary": 2}, quarantined=1), ok, now)
    for _ in range(3):  # a held folder looked at again and again counts once
        history.add(tmp_path, history.Finished("#3-C", held_files=4), ok, now)
    down = {"primary": {"failing_since": now - 3 * 3600, "last_failure_at": now}}
    history.add(tmp_path, history.Finished("#4-D"), down, now)
    later = now + 2 * 3600  # answering again: the hours up to its last failure were down
    history.add(tmp_path, history.Finished("#4-D", {"primary": 5}),
                {"primary": {"failing_since": None, "last_failure_at": now + 3600}}, later)
    found = history.load(tmp_path, hour - 100)
    assert found.counts[("primary", "archived")] == {hour: 5, hour + 2: 5}
    assert found.counts[("", "quarantined")] == {hour: 1}
    assert found.counts[("", "held")] == {hour: 4}
    assert sorted(found.counts[("primary", "down")]) == list(range(hour - 3, hour + 2))
    assert found.names[("held", hour)] == ["#3-C"]
    # a release, then held again: counted again
    history.add(tmp_path, history.Finished("#3-C", {"primary": 4}), ok, now)
    history.add(tmp_path, history.Finished("#3-C", held_files=4), ok, now)
    assert history.load(tmp_path, hour).counts[("", "held")][hour] == 8
    # 15 days later the old hours are gone: bounded
    history.add(tmp_path, history.Finished("#5-E", {"primary": 1}), ok,
                now + (history.KEEP_HOURS + 3) * 3600)
    with sqlite3.connect(history.path_of(tmp_path)) as db:
        hours = [h for (h,) in db.execute("SELECT DISTINCT hour FROM hourly")]
    assert hours == [hour + history.KEEP_HOURS + 3]


def test_a_parked_outage_marks_every_hour_until_the_pacs_answers(tmp_path: Path) -> None:
    """watch parks the folders of a PACS that is down: no folder finishes, yet every hour of
    the outage is marked (history.mark_down, called by each probe that gets no answer)."""
    now = 1_800_000_000.0
    hour = int(now // 3600)
    down = {"primary": {"failing_since": now, "last_failure_at": now}}
    history.add(tmp_path, history.Finished("#1-A"), down, now)  # the batch that found it
    for h in (1, 2, 3):  # probes an hour apart, nothing sent
        history.mark_down(tmp_path, down, now + h * 3600)
    back = {"primary": {"failing_since": None, "last_failure_at": now}}
    history.add(tmp_path, history.Finished("#1-A", {"primary": 2}), back, now + 3.5 * 3600)
    found = history.load(tmp_path, hour - 1)
    assert sorted(found.counts[("primary", "down")]) == [hour, hour + 1, hour + 2, hour + 3]
    assert found.counts[("primary", "archived")] == {hour + 3: 2}


def test_a_down_destination_in_words_and_marked(site: Site, tmp_path: Path) -> None:
    """A real run against a PACS that is not there: the hook counts it, the page says it."""
    site.env["PACS_SERVER_PORT"] = str(free_port())  # nothing listens
    make_patient_folder(site.import_dir, "#21-Down^There", 3, rows=16)
    assert site.run().returncode == 1
    watching = Watching(site)
    try:
        code, page = get(watching.url + "/")
    finally:
        watching.stop()
    assert code == 200
    assert re.search(r"down since \d\d:\d\d, 3 files waiting", page), page
    hour = int(time.time() // 3600)
    down = history.load(site.state_dir, hour - 2).counts[("primary", "down")]
    assert set(down) & {hour, hour - 1}  # this hour (or the one before, at a turn of the hour)


# --- in a real browser -----------------------------------------------------------------------


def _browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver);"
                    " the page is tested by HTTP")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.profile_dir = profile
    return browser


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(driver.profile_dir, ignore_errors=True)


def _seed(state_dir: Path, now: float) -> dict[int, dict[str, int]]:
    """A fortnight of a clinic's days (busy 8-18 h, quiet at night), a few quarantined and
    held files, a five-hour outage yesterday; nothing in the last two hours (the real batches
    of the test land there). Returns hour -> counts as seeded."""
    current = int(now // 3600)
    seeded: dict[int, dict[str, int]] = {}
    for h in range(current - 14 * 24 - 24, current - 1):
        local = time.localtime(h * 3600).tm_hour
        c = {"archived": (12 + (h * 37) % 41) if 8 <= local < 18 else (h % 3 == 0) * 2,
             "quarantined": 1 if h % 29 == 0 and local >= 8 else 0,
             "held": 3 if h % 71 == 0 else 0, "down": 0}
        if current - 30 <= h < current - 25:
            c = {"archived": 0, "quarantined": 0, "held": 0, "down": 1}
        seeded[h] = c
    seeded[current - 3]["quarantined"] = 2  # a quarantine of a hostile name, in the SVG
    counts = [(h, "primary" if k in ("archived", "down") else "", k, n)
              for h, c in seeded.items() for k, n in c.items() if n]
    history.seed(state_dir, counts, [(current - 3, "quarantined", HOSTILE),
                                     (current - 3, "quarantined", "#31-Kim^Chulsoo")])
    return seeded


_BROKEN_WORDS = """
const broken = [];
for (const el of document.querySelectorAll('h1, h2, h3, th, .k, figcaption, .state')) {
  if (!el.getClientRects().length) continue;  // not shown at this width
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const m of node.data.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
      if (tops.size > 1) broken.push(el.tagName + ': ' + m[0]);
    }
  }
}
return broken;
"""

_BARS = """
return [...document.querySelectorAll('section.flow')].map(s => ({
  destination: s.dataset.destination,
  state: s.querySelector('.state').textContent,
  charts: [...s.querySelectorAll('svg.chart')].map(svg => ({
    max: +svg.dataset.max,
    bars: [...svg.querySelectorAll('g.bar')].map(g => ({
      when: g.dataset.when, archived: +g.dataset.archived, quarantined: +g.dataset.quarantined,
      held: +g.dataset.held, down: +g.dataset.down, title: g.querySelector('title').textContent,
      rects: [...g.querySelectorAll('rect')].map(r => ({
        kind: r.getAttribute('class'), n: +(r.dataset.n || 0),
        height: +r.getAttribute('height')}))}))}))}));
"""


def _show(browser: Any, url: str, width: int, mobile: bool) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 844 if mobile else 900, "deviceScaleFactor": 2 if mobile else 1,
        "mobile": mobile})
    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete", 10)


def _screenshot(browser: Any, path: Path, capsys: pytest.CaptureFixture[str],
                whole: bool = True) -> None:
    """The whole page (or what the first screen shows)."""
    import base64

    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize" if whole else "cssLayoutViewport"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": whole,
        "clip": {"x": 0, "y": 0, "width": size.get("width", size.get("clientWidth")),
                 "height": size.get("height", size.get("clientHeight")), "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    with capsys.disabled():  # shown even when the test passes
        print(f"\n  screenshot: {path}", end="")


def test_page_in_a_browser_at_phone_and_desktop_width(
        busy_site: tuple[Site, StoreSCP], browser: Any,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    site, _storescp = busy_site
    now = time.time()
    seeded = _seed(site.state_dir, now)
    reason_file = next(site.failed_dir.rglob("cut.dcm.reason.txt"))
    reason_file.write_text(reason_file.read_text() + HOSTILE_REASON + "\n")
    make_patient_folder(site.import_dir, "#42-홍길동", 2, rows=16)  # the CJK font stack
    watching = Watching(site)
    try:
        wait_for(lambda: (site.log_dir / "log.log").read_text().count("held —") >= 2, 20)
        wait_for(lambda: any("#42-홍길동" in k for k in site.archived()), 20)
        url = watching.url + "/"
        _show(browser, url, 390, mobile=True)
        assert browser.execute_script("return window.innerWidth") == 390
        widths = browser.execute_script(
            "const s = document.scrollingElement; return [s.scrollWidth, s.clientWidth]")
        assert widths[0] <= widths[1], f"scrolls sideways at 390 px: {widths}"
        assert browser.execute_script(_BROKEN_WORDS) == []
        display = browser.execute_script(
            "return [...document.querySelectorAll('td')].map(td => getComputedStyle(td).display)")
        assert display and set(display) == {"block"}  # one card per row
        _screenshot(browser, SCREENSHOTS / "status-390.png", capsys)
        _screenshot(browser, SCREENSHOTS / "status-390-top.png", capsys, whole=False)

        flows = browser.execute_script(_BARS)
        assert [f["destination"] for f in flows] == ["primary"]
        assert flows[0]["state"].startswith("ok, last file ") and "ago" in flows[0]["state"]
        hourly, daily = flows[0]["charts"]
        _check_bars(hourly, daily, seeded, now)

        # hostile names stay text: no element made of them, no script run, in HTML and SVG
        assert browser.execute_script(
            "return document.querySelectorAll('img, script, b, [onerror]').length") == 0
        body = browser.execute_script("return document.body.innerText")
        assert "<img src=x onerror=alert(1)>" in body  # the unmatched list, as text
        assert HOSTILE_REASON in body  # the quarantine reason, as text
        titles = " ".join(b["title"] for b in hourly["bars"])
        assert f"2 quarantined ({HOSTILE}, #31-Kim^Chulsoo)" in titles  # the SVG, as text
        code, source = get(url)
        assert code == 200 and "<img" not in source and "<script" not in source
        assert "&lt;img src=x onerror=alert(1)&gt;" in source

        _show(browser, url, 1280, mobile=False)
        widths = browser.execute_script(
            "const s = document.scrollingElement; return [s.scrollWidth, s.clientWidth]")
        assert widths[0] <= widths[1]
        assert browser.execute_script(_BROKEN_WORDS) == []
        assert browser.execute_script(
            "return getComputedStyle(document.querySelector('td')).display") == "table-cell"
        _screenshot(browser, SCREENSHOTS / "status-1280.png", capsys)
        if os.environ.get("UPDATE_DOCS_SCREENSHOTS"):
            docs = Path(__file__).parent.parent / "docs"
            shutil.copy(SCREENSHOTS / "status-1280.png", docs / "status-page.png")
            shutil.copy(SCREENSHOTS / "status-390-top.png", docs / "status-page-phone.png")
    finally:
        watching.stop()


def _check_bars(hourly: dict, daily: dict, seeded: dict[int, dict[str, int]],
                now: float) -> None:
    """Seeded hours exactly; the last two hours hold what the test's real batches did: #11
    and #42 archived (3 + 2 files), #12's file quarantined, #13's 2 files held once (the watch
    looks at it again)."""
    current = int(now // 3600)
    hours = list(range(current - 47, current + 1))
    bars = hourly["bars"]
    assert [b["when"] for b in bars] == [
        time.strftime("%Y-%m-%d %H:00", time.localtime(h * 3600)) for h in hours]
    for h, bar in zip(hours, bars, strict=True):
        if h in seeded:
            expected = seeded[h]
            assert {k: bar[k] for k in expected} == expected, bar["when"]
    recent = {k: sum(b[k] for b in bars[-2:]) for k in ("archived", "quarantined", "held")}
    assert recent == {"archived": 5, "quarantined": 1, "held": 2}
    assert {b["down"] for b in bars[-2:]} == {0}
    for chart in (hourly, daily):  # heights are the counts, on one scale per chart
        top = chart["max"]
        assert top == max(b["archived"] + b["quarantined"] + b["held"] for b in chart["bars"])
        for bar in chart["bars"]:
            for rect in bar["rects"]:
                if rect["kind"] in ("down", "downmark"):
                    assert bar["down"]
                    continue
                assert rect["n"] == bar[rect["kind"]]
                assert rect["height"] == pytest.approx(
                    max(rect["n"] * history_height() / top, 1.5), abs=0.01)
    days: dict[str, dict[str, int]] = {}
    for h, c in seeded.items():
        day = days.setdefault(time.strftime("%Y-%m-%d", time.localtime(h * 3600)),
                              {"archived": 0, "quarantined": 0, "held": 0, "down": 0})
        for k, n in c.items():
            day[k] += n
    today = daily["bars"][-1]
    assert today["when"] == time.strftime("%Y-%m-%d", time.localtime(now))
    for bar in daily["bars"]:
        expected = days.get(bar["when"], {"archived": 0, "quarantined": 0, "held": 0,
                                          "down": 0})
        if bar["when"] in {time.strftime("%Y-%m-%d", time.localtime(h * 3600))
                           for h in (current - 1, current)}:
            continue  # holds the real batches too (checked by hour above)
        assert {k: bar[k] for k in expected} == expected, bar["when"]
    assert len(daily["bars"]) == 14


def history_height() -> float:
    from importer.chart import HEIGHT

    return HEIGHT


def test_a_release_clicked_in_the_browser_lets_the_held_folder_go_on(
        busy_site: tuple[Site, StoreSCP], browser: Any) -> None:  # noqa: F811
    """At a phone's width, as an operator would: the page's release link, its confirmation,
    the button; the held folder is archived at its next run."""
    from selenium.webdriver.common.by import By

    site, _storescp = busy_site
    held, token = "#13-Two^People", "s3cret-token"
    watching = Watching(site, STATUS_TOKEN=token, STATUS_ACTIONS="on")
    try:
        wait_for(lambda: (site.log_dir / "log.log").read_text().count("held —") >= 2, 20)
        assert not any(k.startswith(held + "/") for k in site.archived())
        _show(browser, f"{watching.url}/?token={token}", 390, mobile=True)
        browser.find_element(By.PARTIAL_LINK_TEXT, "release").click()
        wait_for(lambda: "it goes on at its next run" in browser.page_source, 10)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait_for(lambda: f"released {held}" in browser.page_source, 10)
        wait_for(lambda: any(k.startswith(held + "/") for k in site.archived()), 30)
    finally:
        watching.stop()
