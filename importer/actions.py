"""What an operator may do from the status page (STATUS_ACTIONS=on, behind STATUS_TOKEN):
release a held folder (release.release, exactly as `importer release`) and put a quarantined
file back for import (archive.restore_quarantined, as `importer retry`).

A GET only ever shows what an action would do (a confirmation page); only a POST from that
page does it, and only with the token, from the page's own origin (Origin, else Referer)
and with the confirmation page's CSRF token: an HMAC under a secret of this process, bound
to the action and its target, valid for an hour and once. Every action and every refused
attempt is logged with its time, the client's address and what it did, in the logs and in
STATE_DIR/actions.jsonl, which the page shows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from importer.archive import REASON_SUFFIX, ArchiveError, restore_quarantined
from importer.config import Settings
from importer.folders import display, mask_names
from importer.logs import event, warn
from importer.model import folder_hash
from importer.release import ReleaseError, held_note, held_reason, release

CSRF_TTL = 3600
LOG_LIMIT = 256 * 1024  # actions.jsonl is cut to its newer half beyond this


class ActionError(Exception):
    """The action cannot be done (the message says why)."""


def same_origin(headers: Any, scheme: str) -> bool:
    """The request comes from a page of this server: Origin (or, without it, Referer) names
    the host the browser asked for."""
    host = headers.get("Host", "")
    expected = f"{scheme}://{host}"
    origin = headers.get("Origin")
    if origin:
        return bool(host) and origin == expected
    referer = urllib.parse.urlsplit(headers.get("Referer", ""))
    return bool(host) and f"{referer.scheme}://{referer.netloc}" == expected


class Actions:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secret = secrets.token_bytes(32)
        self.used: dict[str, float] = {}  # CSRF nonces spent, until they expire anyway
        self.lock = threading.Lock()

    # --- CSRF ------------------------------------------------------------------------------

    def _mac(self, nonce: str, issued: int, do: str, target: str) -> str:
        message = f"{nonce}|{issued}|{do}|{target}".encode("utf-8", "surrogateescape")
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def csrf(self, do: str, target: str) -> str:
        nonce, issued = secrets.token_urlsafe(12), int(time.time())
        return f"{nonce}.{issued}.{self._mac(nonce, issued, do, target)}"

    def spend_csrf(self, token: str, do: str, target: str) -> str | None:
        """None if the token is this page's, fresh and unused (it is spent now); else why not."""
        try:
            nonce, issued_text, mac = token.split(".")
            issued = int(issued_text)
        except ValueError:
            return "no valid CSRF token"
        if not hmac.compare_digest(mac, self._mac(nonce, issued, do, target)):
            return "CSRF token not issued for this action"
        now = time.time()
        if not 0 <= now - issued <= CSRF_TTL:
            return "CSRF token expired: open the confirmation page again"
        with self.lock:
            self.used = {n: t for n, t in self.used.items() if now - t <= CSRF_TTL}
            if nonce in self.used:
                return "CSRF token already used"
            self.used[nonce] = issued
        return None

    # --- the actions -----------------------------------------------------------------------

    def describe(self, do: str, target: str) -> str:
        """Exactly what the action will do, in words; ActionError if it cannot be done."""
        s = self.settings
        if do == "release":
            name = self._held(target)
            return (f"Release the held folder {self._shown(name)}: it goes on at its next run"
                    " as it is now (stamped with its folder's identity, sent and archived),"
                    f" accepting what held it: {held_reason(s, name)}. Recorded in the journal"
                    " and in its receipt as released from the status page; a file added or"
                    " changed afterwards lapses the release.")
        if do == "retry":
            path = self._quarantined(target)
            back = s.import_dir.joinpath(*Path(target).parts[1:])
            return (f"Put the quarantined file {self._shown(str(path))} back as"
                    f" {self._shown(str(back))}"
                    " and remove its reason file: it is read, stamped and sent again at that"
                    " folder's next run (and quarantined again if it is still unreadable).")
        raise ActionError(f"no such action: {display(do)}")

    def _shown(self, name: str) -> str:
        s = self.settings
        return mask_names(display(name), s.folder_pattern, s.log_patient_names)

    def _held(self, target: str) -> str:
        """A held folder's name from its target: the hash its held note is kept under (so no
        patient name goes into a URL)."""
        s = self.settings
        if len(target) == 20 and all(c in "0123456789abcdef" for c in target):
            try:
                note = held_note(s, "").with_name(f"{target}.txt")
                name = note.read_text(encoding="utf-8", errors="surrogateescape").split("\n")[0]
            except OSError:
                name = ""
            if (name and folder_hash(name) == target and (s.import_dir / name).is_dir()
                    and held_reason(s, name) is not None):
                return name
        raise ActionError("not a held folder (any more): open the page again")

    def _quarantined(self, target: str) -> Path:
        root = self.settings.failed_dir.resolve()
        path = (root / target).resolve()
        if (root not in path.parents or len(path.relative_to(root).parts) < 3
                or not path.is_file() or not Path(str(path) + REASON_SUFFIX).is_file()):
            raise ActionError(f"{display(target)} is not a quarantined file in {root}")
        return path

    def perform(self, do: str, target: str, client: str) -> str:
        """Do it; returns what was done, in words."""
        self.describe(do, target)  # still possible?
        s = self.settings
        if do == "release":
            try:
                name, accepted = release(s, self._held(target), "from the status page",
                                         by=f"status page ({client})")
            except ReleaseError as exc:
                raise ActionError(str(exc)) from None
            return (f"released {self._shown(name)}: it goes on at its next run"
                    f" (accepted: {accepted})")
        try:
            restored = restore_quarantined(self._quarantined(target), s.failed_dir, s.import_dir)
        except ArchiveError as exc:
            raise ActionError(str(exc)) from None
        return "put back for import: " + ", ".join(self._shown(str(p)) for p in restored)

    # --- the record ------------------------------------------------------------------------

    def record(self, client: str, do: str, target: str, outcome: str, ok: bool) -> None:
        entry = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "client": client, "action": do,
                 "target": self._shown(target), "outcome": outcome, "ok": ok}
        if ok:
            event("INFO", "Status page: %s %s from %s: %s", do, display(target), client, outcome)
        else:
            warn("Status page: %s %s from %s refused: %s", do, display(target), client, outcome)
        path = log_path(self.settings)
        with self.lock:
            try:
                if path.exists() and path.stat().st_size > LOG_LIMIT:
                    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                    path.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
                with open(path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            except OSError as exc:
                warn("Cannot record the status page's action in %s: %s", path, exc.strerror)


def log_path(settings: Settings) -> Path:
    return settings.state_dir / "actions.jsonl"


def recent(settings: Settings, count: int = 10) -> list[dict[str, Any]]:
    """The last actions and refusals, newest first."""
    try:
        lines = log_path(settings).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in reversed(lines[-count:]):
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found
