"""The status page's picture of the flow: per destination, files archived per hour over the
last 48 hours and per day over the last 14 days, quarantined and held files stacked on top,
the hours the destination was down behind them, and its state in words beside them.

Server-side SVG inline in the page: no JavaScript, no external asset (the page's CSP allows
none). Every bar carries its counts as data attributes and a title (what a person hovers
or a test reads); every text is escaped by the caller's escape function, which also masks
patient names. Pure: counts (history.py) and status in, markup out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from importer.history import SITE, History

HOURS = 48
DAYS = 14
HEIGHT = 80.0  # plot height in the SVG's units
TOP, BOTTOM, LEFT = 8.0, 18.0, 30.0
MIN_BAR = 1.5  # a quarantined file among hundreds archived must still show
STACK = ("archived", "quarantined", "held")  # bottom to top

Escape = Callable[[object], str]


@dataclass
class Bar:
    label: str  # "2026-12-02 10:00" or "2026-12-02"
    tick: str  # under the bar, or ""
    archived: int = 0
    quarantined: int = 0
    held: int = 0
    down: int = 0  # hours down
    names: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (kind, folders)

    @property
    def total(self) -> int:
        return self.archived + self.quarantined + self.held


def hourly_bars(history: History, destination: str, now: float) -> list[Bar]:
    """The last HOURS hours, this one last."""
    current = int(now // 3600)
    bars = []
    for hour in range(current - HOURS + 1, current + 1):
        local = time.localtime(hour * 3600)
        tick = ""
        if local.tm_hour % 6 == 0:
            tick = time.strftime("%a" if local.tm_hour == 0 else "%H:%M", local)
        bars.append(_bar(history, destination, [hour], time.strftime("%Y-%m-%d %H:00", local),
                         tick))
    return bars


def daily_bars(history: History, destination: str, now: float) -> list[Bar]:
    """The last DAYS local days, today last (a day is its hours, whatever DST does)."""
    current = int(now // 3600)
    by_day: dict[str, list[int]] = {}
    for hour in range(current - DAYS * 24 - 24, current + 1):
        by_day.setdefault(time.strftime("%Y-%m-%d", time.localtime(hour * 3600)), []).append(hour)
    days = sorted(by_day)[-DAYS:]
    return [_bar(history, destination, by_day[day], day, day[8:].lstrip("0")) for day in days]


def _bar(history: History, destination: str, hours: list[int], label: str, tick: str) -> Bar:
    bar = Bar(label, tick)
    bar.archived = sum(history.get(destination, "archived", h) for h in hours)
    bar.quarantined = sum(history.get(SITE, "quarantined", h) for h in hours)
    bar.held = sum(history.get(SITE, "held", h) for h in hours)
    bar.down = sum(1 for h in hours if history.get(destination, "down", h))
    bar.names = tuple((kind, tuple(n for h in hours for n in history.names.get((kind, h), ())))
                      for kind in ("quarantined", "held"))
    return bar


def svg(bars: list[Bar], step: float, caption: str, e: Escape) -> str:
    """A bar chart: stacked archived/quarantined/held, down periods as a band behind."""
    width = LEFT + len(bars) * step + 4
    top = max((b.total for b in bars), default=0)
    scale = HEIGHT / top if top else 0.0
    base = TOP + HEIGHT
    out = [f'<svg class=chart viewBox="0 0 {width:g} {base + BOTTOM:g}" role="img"'
           f' aria-label="{e(caption)}" data-max="{top}" xmlns="http://www.w3.org/2000/svg">',
           f'<text class=axis x="{LEFT - 3:g}" y="{TOP + 7:g}" text-anchor="end">{top}</text>',
           f'<text class=axis x="{LEFT - 3:g}" y="{base:g}" text-anchor="end">0</text>',
           f'<line class=base x1="{LEFT:g}" x2="{width - 4:g}" y1="{base:g}" y2="{base:g}"/>']
    for i, bar in enumerate(bars):
        x = LEFT + i * step
        out.append(f'<g class=bar data-when="{e(bar.label)}" data-archived="{bar.archived}"'
                   f' data-quarantined="{bar.quarantined}" data-held="{bar.held}"'
                   f' data-down="{bar.down}"><title>{_title(bar, e)}</title>')
        if bar.down:  # a band behind the bar, and a strip under it a tall bar cannot hide
            out.append(f'<rect class=down x="{x:g}" y="{TOP:g}" width="{step:g}"'
                       f' height="{HEIGHT:g}"/><rect class=downmark x="{x:g}" y="{base + 1:g}"'
                       f' width="{step:g}" height="3"/>')
        y = base
        for kind in STACK:
            n = getattr(bar, kind)
            if n:
                h = round(max(n * scale, MIN_BAR), 2)
                y -= h
                out.append(f'<rect class={kind} data-n="{n}" x="{x + 0.5:g}" y="{y:.2f}"'
                           f' width="{step - 1:g}" height="{h:g}"/>')
        out.append("</g>")
        if bar.tick:
            out.append(f'<text class=tick x="{x + step / 2:g}" y="{base + 13:g}"'
                       f' text-anchor="middle">{e(bar.tick)}</text>')
    out.append("</svg>")
    return "".join(out)


def _title(bar: Bar, e: Escape) -> str:
    """The bar in words, as markup: each folder name escaped (and masked) on its own."""
    words = [e(f"{bar.label}: {bar.archived} archived")]
    names = dict(bar.names)
    for kind in ("quarantined", "held"):
        n = getattr(bar, kind)
        if n:
            folders = names.get(kind, ())
            words.append(e(f"{n} {kind}")
                         + (f" ({', '.join(e(f) for f in folders)})" if folders else ""))
    if bar.down:
        words.append("destination down" + (f" {bar.down} h" if ":" not in bar.label else ""))
    return ", ".join(words)


def state_words(destination: dict, now: float) -> tuple[bool, str]:
    """(ok, "ok, last file 2 min ago") or (False, "down since 10:42, 312 files waiting")."""
    waiting = destination["files_waiting"]
    files = f"{waiting:,} file{'' if waiting == 1 else 's'} waiting"
    since = destination.get("failing_since_ts")
    if since:
        return False, f"down since {_clock(since, now)}, {files}"
    last = destination.get("last_success_ts")
    words = f"ok, last file {_ago(now - last)}" if last else "ok, no file sent yet"
    return True, words + (f", {files}" if waiting else "")


def _clock(timestamp: float, now: float) -> str:
    same_day = time.localtime(timestamp)[:3] == time.localtime(now)[:3]
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", time.localtime(timestamp))


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def flow(destinations: list[dict], history: History, now: float, e: Escape) -> str:
    """The section at the top of the page: one block per destination."""
    keys = "".join(f'<span class=item><span class="key {kind}"></span>{words}</span> '
                   for kind, words in (("archived", "archived"), ("quarantined", "quarantined"),
                                       ("held", "held"), ("down", "destination down")))
    parts = [f"<p class=legend>{keys}<span class=none>(quarantined and held files count for"
             " the whole site)</span></p>"]
    for d in destinations:
        ok, words = state_words(d, now)
        hours, days = hourly_bars(history, d["name"], now), daily_bars(history, d["name"], now)
        in_48 = sum(b.archived for b in hours)
        in_14 = sum(b.archived for b in days)
        parts.append(
            f'<section class=flow data-destination="{e(d["name"])}">'
            f'<div class=words><h3>{e(d["destination"])}'
            f' <span class=none>({e(d["name"])})</span></h3>'
            f'<p class="state {"ok" if ok else "bad"}">{e(words)}</p>'
            f'<p class=none>{in_48:,} archived in 48 h, {in_14:,} in 14 days</p></div>'
            '<div class=charts>'
            f'<figure>{svg(hours, 8, "files per hour, last 48 hours", e)}'
            '<figcaption>per hour, last 48 h</figcaption></figure>'
            f'<figure>{svg(days, 24, "files per day, last 14 days", e)}'
            '<figcaption>per day, last 14 days</figcaption></figure>'
            "</div></section>")
    return "".join(parts)


STYLE = """.flow{display:flex;flex-wrap:wrap;gap:0 1.5em;margin-bottom:1em}.words{flex:1 1 14em;
max-width:22em}.charts{flex:100 1 30em;display:flex;flex-wrap:wrap;gap:.5em 1.5em;min-width:0}
.charts figure{flex:1 1 18em;min-width:0;margin:0}.item{white-space:nowrap}
svg.chart{display:block;width:100%;height:auto;font-size:9px}
figcaption{font-size:.85em;color:#555}.archived{fill:#2e7d32;background:#2e7d32}
.quarantined{fill:#c62828;background:#c62828}.held{fill:#f9a825;background:#f9a825}
.down{fill:#ffcdd2;background:#ffcdd2}.downmark{fill:#e53935}.axis,.tick{fill:#555}
.base{stroke:#999;stroke-width:.5}
.key{display:inline-block;width:.9em;height:.9em;vertical-align:-.1em;margin:0 .25em 0 .6em}
.flow h3{margin:.8em 0 .1em;font-size:1em}.state{font-size:1.1em;margin:.1em 0}"""
