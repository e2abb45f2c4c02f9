"""What the status page shows, rendered (pure: status data in, text out): the page, a
receipt, the /metrics text.

Every value goes through _e (HTML-escaped, patient names masked under
LOG_PATIENT_NAMES=false): folder names are user input. One stylesheet, inline (the CSP
allows no other): below 600 px a table becomes one card per row, each cell with its column
head above it, so nothing scrolls sideways and no head is broken inside a word; paths may
wrap after each `/`; Korean, Chinese and Japanese names get a CJK font where the viewer has
one.
"""

from __future__ import annotations

import html
import json
import time
import urllib.parse
from collections.abc import Collection
from pathlib import Path
from typing import Any

from importer import actions, chart, metrics, progress
from importer.audit import missing_key
from importer.config import Settings
from importer.folders import display, mask_names
from importer.history import load
from importer.model import folder_hash
from importer.receipt import destination_cells, receipt_path
from importer.status import gather_status


def _e(settings: Settings, value: Any) -> str:
    """A value as HTML text, patient names masked under LOG_PATIENT_NAMES=false."""
    return html.escape(mask_names(str(value if value is not None else ""),
                                  settings.folder_pattern, settings.log_patient_names))


def _path(settings: Settings, value: Any) -> str:
    """A path as HTML text that may break after each `/` (and only there, unless a part is
    wider than the screen)."""
    return _e(settings, value).replace("/", "/<wbr>")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A table; on a phone each row a card, each cell under its head (the .k label)."""
    if not rows:
        return "<p class=none>none</p>"
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td><span class=k>{h}</span>{c}</td>"
                                    for h, c in zip(headers, row, strict=True)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


FONTS = ('system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK KR",'
         '"Noto Sans CJK JP","Noto Sans CJK SC","Apple SD Gothic Neo","Malgun Gothic",'
         '"Hiragino Sans","Microsoft YaHei",sans-serif')

STYLE = f"""body{{font:14px/1.4 {FONTS};margin:1em auto;padding:0 1em;max-width:72em}}
h1{{font-size:1.4em;margin:.2em 0}}h2{{margin-top:1.5em;font-size:1.15em}}
h1,h2,h3,th,.k{{word-break:keep-all;overflow-wrap:normal;hyphens:manual}}
table{{border-collapse:collapse;width:100%;margin-bottom:1em}}td,th{{border-bottom:1px solid
#ddd;padding:.3em;text-align:left;vertical-align:top}}td{{overflow-wrap:anywhere}}
.k{{display:none}}.bad{{color:#b00}}.ok{{color:#070}}.none{{color:#777}}
code{{overflow-wrap:anywhere}}.act{{white-space:nowrap}}button{{font:inherit;padding:.4em 1em}}
@media (max-width:600px){{body{{padding:0 .6em}}table,thead,tbody,tr,td{{display:block}}
thead{{display:none}}tr{{border:1px solid #ddd;border-radius:6px;margin:.5em 0;
padding:.3em .6em}}td{{border:0;padding:.15em 0}}.k{{display:block;font-size:.8em;
color:#666}}}}
{chart.STYLE}"""


def _document(title: str, body: str, refresh: bool) -> str:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")


def render_page(settings: Settings, token: str = "", now: float | None = None, *,
                under_way: Collection[str] = ()) -> str:
    """under_way: keys of the archived folders a resend is queued or running for."""
    now = time.time() if now is None else now
    s = gather_status(settings)
    e = lambda v: _e(settings, v)  # noqa: E731
    p = lambda v: _path(settings, v)  # noqa: E731
    suffix = f"&token={urllib.parse.quote(token)}" if token else ""
    history = load(settings.state_dir, int(now // 3600) - chart.DAYS * 24 - 24)
    parts = [f"<h1>dicom-importer</h1><p>{p(s['import_dir'])} · "
             f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)))}</p>"]
    if (batch := progress.current()) is not None:  # watch is sending a batch right now
        eta = f"ETA {batch['eta_s']} s" if batch["eta_s"] is not None else "ETA -"
        parts.append(f"<p class=ok>Sending now: {batch['answered']:,} of {batch['files']:,}"
                     f" files answered ({batch['left']:,} left, {batch['folders']:,} folders"
                     f" listed), {batch['rate']:g} files/s, {eta}</p>")
    parts.append("<h2>Flow</h2>" + chart.flow(s["destinations"], history, now, e))
    parts.append("<h2>Destinations</h2>" + _table(
        ["PACS", "health", "last success", "last failure", "files waiting"],
        [[f"{e(d['destination'])} ({e(d['name'])}{'' if d['required'] else ', optional'})",
          (f"<span class=bad>failing since {e(d['failing_since'])}</span>"
           if d["failing_since"] else "<span class=ok>ok</span>"),
          e(d["last_success"] or "never"),
          e(f"{d['last_failure']}: {d['last_error']}" if d["last_failure"] else "never"),
          e(d["files_waiting"])] for d in s["destinations"]]))
    parts.append("<h2>Folders waiting</h2>" + _table(
        ["folder", "files", "quiet for", "due in"],
        [[e(f["folder"]), e(f["files"]), e(f"{f['quiet_for_s']} s"), e(f"{f['due_in_s']} s")]
         for f in s["pending"]]))
    act = _action_link(settings, token)
    parts.append("<h2>Held: identity conflict or two patients</h2>"
                 "<p>Fix the folder (rename it to the right ID, split it), or accept with"
                 " <code>importer release FOLDER</code>.</p>" + _table(
        ["folder", "why"], [[e(h["folder"]) + act("release", folder_hash(h["folder"]), "release…"),
                             e(h["reason"])] for h in s["held"]]))
    parts.append("<h2>Quarantined</h2>" + _table(
        ["file", "reason"],
        [[p(q["file"]) + act("retry", _failed_rel(settings, q["file"]), "retry…"),
          e(q["reason"])] for q in s["quarantined"]]))
    parts.append("<h2>Archived, missing at a PACS</h2>" + _table(
        ["folder", "missing"],
        [[e(m["folder"]) + (" <span class=none>resend under way</span>"
                            if missing_key(m["folder"]) in under_way
                            else act("resend", missing_key(m["folder"]), "resend…")),
          e("; ".join(f"{n}: {len(d['missing'])}"
                      for n, d in m["destinations"].items() if d["missing"]))]
         for m in s["missing_at_pacs"]]))
    parts.append("<h2>Not matching the folder pattern (left untouched)</h2>" + _table(
        ["entry"], [[e(u)] for u in s["unmatched"]]))
    parts.append("<h2>Last archived</h2>" + _table(
        ["folder", "batch", "receipt"],
        [[e(a["folder"]), e(a["batch"]),
          (f'<a href="/receipt?path={urllib.parse.quote(a["receipt"])}{suffix}">receipt</a>'
           if a["receipt"] else "none")] for a in s["recent_archives"]]))
    done = actions.recent(settings)
    if settings.status_actions or done:
        parts.append("<h2>Actions from this page</h2>" + _table(
            ["when", "client", "action", "outcome"],
            [[e(a["at"]), e(a["client"]), e(f"{a['action']} {a['target']}"),
              f'<span class={"ok" if a["ok"] else "bad"}>'
              f'{e(("refused: " if a.get("refused", not a["ok"]) else "") + a["outcome"])}'
              "</span>"] for a in done]))
    return _document("dicom-importer", "".join(parts), refresh=True)


def _action_link(settings: Settings, token: str) -> Any:
    """A link to an action's confirmation page (nothing when actions are off)."""
    def link(do: str, target: str | None, words: str) -> str:
        if not settings.status_actions or target is None:
            return ""
        query = urllib.parse.urlencode({"do": do, "target": target, "token": token})
        return f' <a class=act href="/action?{html.escape(query)}">{words}</a>'
    return link


def _failed_rel(settings: Settings, shown: str) -> str | None:
    if not settings.log_patient_names:
        return None  # the target is a path with the patient's name: no link, no name in a URL
    try:
        return str(Path(shown).relative_to(settings.failed_dir))
    except ValueError:
        return None


def render_confirm(settings: Settings, do: str, target: str, words: str, csrf: str,
                   token: str) -> str:
    """The confirmation step: what exactly will happen, and the one form that does it."""
    fields = "".join(f'<input type=hidden name="{k}" value="{html.escape(v)}">'
                     for k, v in (("do", do), ("target", target), ("csrf", csrf),
                                  ("token", token)))
    back = f'/{"?token=" + urllib.parse.quote(token) if token else ""}'
    body = (f"<h1>Confirm: {html.escape(do)}</h1><p>{_e(settings, words)}</p>"
            f'<form method=post action="/action">{fields}'
            f'<button type=submit>{html.escape(do)} {_e(settings, display(target))}</button>'
            f' <a href="{html.escape(back)}">cancel</a></form>')
    return _document(f"confirm {do}", body, refresh=False)


def render_done(settings: Settings, done: str, token: str) -> str:
    back = f'/{"?token=" + urllib.parse.quote(token) if token else ""}'
    return _document("done", f"<h1>Done</h1><p>{_e(settings, done)}</p>"
                             f'<p><a href="{html.escape(back)}">back</a></p>', refresh=False)


def render_receipt(settings: Settings, relative: str, token: str = "") -> str | None:
    """A receipt as a table; None unless relative names a receipt inside ARCHIVE_DIR."""
    root = settings.archive_dir.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError):
        return None
    if root not in path.parents:
        return None
    try:
        if path.is_dir():
            path = receipt_path(path)
        if not (path.name.endswith(".receipt.json") and path.is_file()):
            return None
        receipt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a name too long, an unreadable or broken receipt
        return None
    e = lambda v: _e(settings, v)  # noqa: E731
    names = [d["name"] for d in receipt["destinations"]]
    rows = [[_path(settings, f["path"]), e(f["size"]),
             *(e(c) for c in destination_cells(f, names))] for f in receipt["files"]]
    back = f'<p><a href="/{"?token=" + urllib.parse.quote(token) if token else ""}">back</a></p>'
    body = (f"{back}<h1>Receipt</h1><p>{e(receipt['folder'])}: PatientID "
            f"{e(receipt['patient']['id'])}, PatientName {e(receipt['patient']['name'])}</p>"
            + _table(["file", "bytes", *[e(n) for n in names]], rows))
    return _document("receipt", body, refresh=False)


def render_metrics(settings: Settings) -> str:
    s = gather_status(settings)
    gauges: list[tuple[str, str, dict[str, str], float]] = [
        ("dicom_importer_waiting_folders", "Patient folders in the import dir", {},
         len(s["pending"])),
        ("dicom_importer_waiting_files", "Files in the import dir", {},
         sum(p["files"] for p in s["pending"])),
        ("dicom_importer_oldest_waiting_file_age_seconds", "Age of the oldest waiting file",
         {}, max((p["oldest_file_age_s"] for p in s["pending"]), default=0)),
        ("dicom_importer_held_folders",
         "Folders held: identity conflict or possibly two patients", {}, len(s["held"])),
        ("dicom_importer_quarantined_files", "Files in FAILED_DIR", {}, len(s["quarantined"])),
        ("dicom_importer_missing_at_pacs_folders", "Archived folders a PACS no longer holds",
         {}, len(s["missing_at_pacs"])),
    ]
    for d in s["destinations"]:
        labels = {"destination": d["name"]}
        gauges += [
            ("dicom_importer_destination_last_success_timestamp_seconds",
             "When the destination last acknowledged a file", labels,
             d["last_success_ts"] or 0),
            ("dicom_importer_destination_failing", "1 while the destination fails", labels,
             1 if d["failing_since_ts"] else 0),
            ("dicom_importer_destination_files_waiting",
             "Files the destination has not acknowledged yet", labels, d["files_waiting"]),
        ]
    return metrics.render(gauges)
