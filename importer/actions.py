"""What an operator may do from the status page (STATUS_ACTIONS=on, behind STATUS_TOKEN):
release a held folder (release.release, exactly as `importer release`), put a quarantined
file back for import (archive.restore_quarantined, as `importer retry`) and resend what a
PACS lost of an archived folder (resend.resend_missing, as `importer resend`; queued, and
run in a thread of its own: resend_queue.py).

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
from importer.audit import missing_entry
from importer.config import Settings
from importer.folders import display, mask_names
from importer.logs import event, warn
from importer.model import folder_hash
from importer.release import ReleaseError, held_note, held_reason, read_note, release
from importer.resend_queue import Job, ResendQueue

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
        self.resends = ResendQueue(settings, self._resend_ended)

    def close(self) -> None:
        """The status page stops: so does its resend worker (queued resends are recorded
        as not started)."""
        self.resends.stop()

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
        if do == "resend":
            folder, lacking = self._missing(target)
            return (f"Resend what a PACS no longer lists of the archived folder {folder}:"
                    f" {lacking}, as the last audit found. Each PACS is asked again first;"
                    " only the instances it still lacks are copied back into"
                    f" {self._shown(str(s.import_dir / Path(folder).name))}, stamped with the"
                    " folder's identity, sent to the PACS that lack them (no other), checked"
                    " by C-FIND and archived again, with a new receipt beside the old one."
                    " It is queued and runs in the background, one resend at a time and never"
                    " beside the import's own batch on that folder; its outcome is listed"
                    " under \"Actions from this page\" when it ends.")
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
                note = read_note(held_note(s, "").with_name(f"{target}.txt"))
            except OSError:
                note = None
            name = note[0] if note is not None else ""
            if name and folder_hash(name) == target and (s.import_dir / name).is_dir():
                return name
        raise ActionError("not a held folder (any more): open the page again")

    def _missing(self, target: str) -> tuple[str, str]:
        """An archived folder a PACS lacks instances of, from its entry's key (no patient
        name in a URL), shown, and what is missing where; ActionError if it is not (any
        more) listed, or a resend of it is already under way."""
        entry = missing_entry(self.settings, target)
        if entry is None:
            raise ActionError("not listed as missing at a PACS (any more): open the page again")
        folder = self._shown(entry["folder"])
        if (job := self.resends.job(target)) is not None:
            raise ActionError(f"a resend of {folder} is already under way (queued at"
                              f" {job.queued_at} from {job.client})")
        labels = {d.name: d.label for d in self.settings.destinations}
        lacking, elsewhere = [], []
        for name, d in entry.get("destinations", {}).items():
            label = labels.get(name, name)
            if d.get("missing"):
                n = len(d["missing"])
                lacking.append(f"{n} instance{'s' if n != 1 else ''} to {label}")
            if d.get("under_another_patient_id"):
                elsewhere.append(f"{len(d['under_another_patient_id'])} at {label}")
        if not lacking:
            raise ActionError(f"{folder}: nothing a PACS lacks that a resend would change"
                              " (instances under another PatientID: sort that out in the PACS)")
        words = ", ".join(lacking)
        if elsewhere:
            words += (f" (not those listed under another PatientID, {', '.join(elsewhere)}:"
                      " resending under the same UID would not change them)")
        return folder, words

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
        if do == "resend":
            return self._queue_resend(target, client)
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

    def _queue_resend(self, target: str, client: str) -> str:
        folder, lacking = self._missing(target)
        entry = missing_entry(self.settings, target)
        assert entry is not None  # _missing found it
        job = Job(target, Path(entry["folder"]), client, time.strftime("%Y-%m-%d %H:%M:%S"))
        if (other := self.resends.submit(job)) is not None:
            raise ActionError(f"a resend of {folder} is already under way (queued at"
                              f" {other.queued_at} from {other.client})" if other is not job
                              else "the importer is stopping: nothing new starts")
        return (f"queued: resend of {folder} ({lacking}); its outcome is listed under"
                " \"Actions from this page\" when it ends")

    def _resend_ended(self, job: Job, ok: bool, words: str) -> None:
        self.record(job.client, "resend", job.key,
                    f"resend of {self._shown(str(job.folder))} (queued at {job.queued_at})"
                    f" ended: {words}", ok, refused=False)

    # --- the record ------------------------------------------------------------------------

    def record(self, client: str, do: str, target: str, outcome: str, ok: bool, *,
               refused: bool | None = None) -> None:
        """refused (by default: not ok): the request was turned down, as against an action
        done that failed (a resend that ended without everything back)."""
        refused = not ok if refused is None else refused
        entry = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "client": client, "action": do,
                 "target": self._shown(target), "outcome": outcome, "ok": ok,
                 "refused": refused}
        if ok:
            event("INFO", "Status page: %s %s from %s: %s", do, display(target), client, outcome)
        else:
            warn("Status page: %s %s from %s %s: %s", do, display(target), client,
                 "refused" if refused else "failed", outcome)
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
