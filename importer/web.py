"""The status page `importer watch` serves when STATUS_LISTEN is set: `/` (a page that
refreshes itself), `/receipt?path=<ts>/<folder>`, `/metrics` (Prometheus) and `/healthz`.

A view of the data `importer status --json` gives (status.gather_status, read afresh per
request: one source of truth), read-only, standard library only. It runs in its own
threads, apart from the watch loop: each connection has a timeout and their number a
bound, so a slow or hostile client stalls nothing. Every value is HTML-escaped (folder
names are user input); patient names are masked under LOG_PATIENT_NAMES=false; on any
address but loopback a token is required (compared in constant time); TLS where a
certificate is given.
"""

from __future__ import annotations

import hmac
import html
import json
import socket
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from importer import metrics
from importer.config import Settings
from importer.folders import mask_names
from importer.receipt import destination_cells, receipt_path
from importer.status import gather_status

MAX_CONNECTIONS = 16
CLIENT_TIMEOUT = 10.0
HEARTBEAT_STALE = 300.0


class StatusPage:
    """The server, in a daemon thread; start() returns at once."""

    def __init__(self, settings: Settings) -> None:
        assert settings.status_listen is not None
        self.settings = settings
        host, port = settings.status_listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (_BoundedServer,), {"address_family": family})
        self.server = server_class((host, port), _handler(settings))
        if settings.status_tls_cert and settings.status_tls_key:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(settings.status_tls_cert, settings.status_tls_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.server.serve_forever, name="status-page",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        scheme = "https" if self.settings.status_tls_cert else "http"
        return f"{scheme}://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _BoundedServer(ThreadingHTTPServer):
    daemon_threads = True
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # too many at once: drop this one
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _handler(settings: Settings) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = CLIENT_TIMEOUT  # a client that sends nothing is dropped
        server_version = "dicom-importer"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path == "/healthz":
                return self._healthz()
            if not self._authorised(query):
                return self._send(401, "text/plain", "token required\n",
                                  {"WWW-Authenticate": "Bearer"})
            token = query.get("token", [""])[0]
            if url.path == "/":
                return self._send(200, "text/html", render_page(settings, token))
            if url.path == "/metrics":
                return self._send(200, "text/plain; version=0.0.4", render_metrics(settings))
            if url.path == "/receipt":
                page = render_receipt(settings, query.get("path", [""])[0], token)
                if page is None:
                    return self._send(404, "text/plain", "no such receipt\n")
                return self._send(200, "text/html", page)
            return self._send(404, "text/plain", "not found\n")

        def _authorised(self, query: dict[str, list[str]]) -> bool:
            if not settings.status_token:
                return True
            given = query.get("token", [""])[0]
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[len("Bearer "):]
            return hmac.compare_digest(given.encode(), settings.status_token.encode())

        def _healthz(self) -> None:
            try:
                age = time.time() - (settings.state_dir / "heartbeat").stat().st_mtime
            except OSError:
                age = float("inf")
            ok = age < HEARTBEAT_STALE
            self._send(200 if ok else 503, "text/plain", "ok\n" if ok else "stale\n")

        def _send(self, code: int, kind: str, body: str,
                  headers: dict[str, str] | None = None) -> None:
            data = body.encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             "default-src 'none'; style-src 'unsafe-inline'")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # requests are not events worth a log line

    return Handler


# --- rendering (pure: status data in, text out) ---------------------------------------------


def _e(settings: Settings, value: Any) -> str:
    """A value as HTML text, patient names masked under LOG_PATIENT_NAMES=false."""
    return html.escape(mask_names(str(value if value is not None else ""),
                                  settings.folder_pattern, settings.log_patient_names))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p class=none>none</p>"
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = """body{font:14px system-ui,sans-serif;margin:1em;max-width:70em}
table{border-collapse:collapse;width:100%;margin-bottom:1em}td,th{border-bottom:1px solid #ddd;
padding:.3em;text-align:left;vertical-align:top;word-break:break-word}.bad{color:#b00}
.ok{color:#070}.none{color:#777}h2{margin-top:1.5em;font-size:1.1em}"""


def _document(title: str, body: str, refresh: bool) -> str:
    meta = '<meta http-equiv="refresh" content="10">' if refresh else ""
    return (f'<!doctype html><html><head><meta charset="utf-8">{meta}'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>")


def render_page(settings: Settings, token: str = "") -> str:
    s = gather_status(settings)
    e = lambda v: _e(settings, v)  # noqa: E731
    suffix = f"&token={urllib.parse.quote(token)}" if token else ""
    parts = [f"<h1>dicom-importer</h1><p>{e(s['import_dir'])} · "
             f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]
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
        [[e(p["folder"]), e(p["files"]), e(f"{p['quiet_for_s']} s"), e(f"{p['due_in_s']} s")]
         for p in s["pending"]]))
    parts.append("<h2>Held: identity conflict or two patients</h2>"
                 "<p>Fix the folder (rename it to the right ID, split it), or accept with"
                 " <code>importer release FOLDER</code>.</p>" + _table(
        ["folder", "why"], [[e(h["folder"]), e(h["reason"])] for h in s["held"]]))
    parts.append("<h2>Quarantined</h2>" + _table(
        ["file", "reason"], [[e(q["file"]), e(q["reason"])] for q in s["quarantined"]]))
    parts.append("<h2>Archived, missing at a PACS</h2>" + _table(
        ["folder", "missing"],
        [[e(m["folder"]), e("; ".join(f"{n}: {len(d['missing'])}"
                                      for n, d in m["destinations"].items() if d["missing"]))]
         for m in s["missing_at_pacs"]]))
    parts.append("<h2>Not matching the folder pattern (left untouched)</h2>" + _table(
        ["entry"], [[e(u)] for u in s["unmatched"]]))
    parts.append("<h2>Last archived</h2>" + _table(
        ["folder", "batch", "receipt"],
        [[e(a["folder"]), e(a["batch"]),
          (f'<a href="/receipt?path={urllib.parse.quote(a["receipt"])}{suffix}">receipt</a>'
           if a["receipt"] else "none")] for a in s["recent_archives"]]))
    return _document("dicom-importer", "".join(parts), refresh=True)


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
    rows = [[e(f["path"]), e(f["size"]), *(e(c) for c in destination_cells(f, names))]
            for f in receipt["files"]]
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
