"""The status page `importer watch` serves when STATUS_LISTEN is set: `/` (a page that
refreshes itself), `/receipt?path=<ts>/<folder>`, `/metrics` (Prometheus) and `/healthz`.

This module is the server: what is served where, to whom, and how (pages.py renders, chart.py
draws the flow). A view of the data `importer status --json` gives (status.gather_status,
read afresh per request: one source of truth), read-only, standard library only. It runs in
its own threads, apart from the watch loop: each connection has a timeout and their number a
bound, so a slow or hostile client stalls nothing. Every value is HTML-escaped (folder
names are user input); patient names are masked under LOG_PATIENT_NAMES=false; on any
address but loopback a token is required (compared in constant time); TLS where a
certificate is given.
"""

from __future__ import annotations

import hmac
import socket
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from importer.actions import ActionError, Actions, same_origin
from importer.config import Settings
from importer.pages import render_confirm, render_done, render_metrics, render_page, render_receipt

MAX_CONNECTIONS = 16
MAX_FORM = 64 * 1024
CLIENT_TIMEOUT = 10.0
HEARTBEAT_STALE = 300.0


class StatusPage:
    """The server, in a daemon thread; start() returns at once."""

    def __init__(self, settings: Settings) -> None:
        assert settings.status_listen is not None
        self.settings = settings
        # The page owns the actions, and with them the resend worker: stopped with it.
        self.actions = Actions(settings) if settings.status_actions else None
        host, port = settings.status_listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (_BoundedServer,), {"address_family": family})
        self.server = server_class((host, port), _handler(settings, self.actions))
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
        if self.actions is not None:
            self.actions.close()


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


def _handler(settings: Settings, actions: Actions | None) -> type[BaseHTTPRequestHandler]:
    scheme = "https" if settings.status_tls_cert else "http"

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
                under_way = actions.resends.busy() if actions is not None else set()
                return self._send(200, "text/html", render_page(settings, token,
                                                                under_way=under_way))
            if url.path == "/action":  # only shows what the action would do
                if actions is None:
                    return self._send(403, "text/plain", "actions are off (STATUS_ACTIONS)\n")
                do, target = query.get("do", [""])[0], query.get("target", [""])[0]
                try:
                    words = actions.describe(do, target)
                except ActionError as exc:
                    return self._send(404, "text/plain", f"{exc}\n")
                return self._send(200, "text/html", render_confirm(
                    settings, do, target, words, actions.csrf(do, target), token))
            if url.path == "/metrics":
                return self._send(200, "text/plain; version=0.0.4", render_metrics(settings))
            if url.path == "/receipt":
                page = render_receipt(settings, query.get("path", [""])[0], token)
                if page is None:
                    return self._send(404, "text/plain", "no such receipt\n")
                return self._send(200, "text/html", page)
            return self._send(404, "text/plain", "not found\n")

        def do_POST(self) -> None:  # noqa: N802
            """An action, only from its confirmation page: token, origin, CSRF token."""
            client = self.client_address[0]
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_FORM:
                return self._send(413, "text/plain", "form too large\n")
            form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            do, target = form.get("do", [""])[0], form.get("target", [""])[0]
            if urllib.parse.urlsplit(self.path).path != "/action":
                return self._send(404, "text/plain", "not found\n")
            refused = None
            if actions is None:
                code, refused = 403, "actions are off (STATUS_ACTIONS)"
            elif not self._authorised(form):
                code, refused = 401, "token required"
            elif not same_origin(self.headers, scheme):
                code, refused = 403, "not from this page's origin (Origin/Referer)"
            elif why := actions.spend_csrf(form.get("csrf", [""])[0], do, target):
                code, refused = 403, why
            if refused is not None:
                if actions is not None:
                    actions.record(client, do, target, refused, ok=False)
                return self._send(code, "text/plain", f"refused: {refused}\n")
            assert actions is not None
            try:
                done = actions.perform(do, target, client)
            except ActionError as exc:
                actions.record(client, do, target, str(exc), ok=False)
                return self._send(409, "text/plain", f"not done: {exc}\n")
            actions.record(client, do, target, done, ok=True)
            token = form.get("token", [""])[0]
            self._send(200, "text/html", render_done(settings, done, token))

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
                             "default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
                             " frame-ancestors 'none'")
            self.send_header("X-Frame-Options", "DENY")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # requests are not events worth a log line

    return Handler
