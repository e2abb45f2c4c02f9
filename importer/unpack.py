"""Archives in a patient folder (a portal's ZIP, Windows' compressed folder, a tar.gz) are
imported: unpacked beside themselves, their files then go through the same pipeline under
the folder's identity; the archive itself is archived as it came, with the folder, never sent.

Layout: `<folder>/<rel>` is unpacked into `<folder>/.unpacked/<rel>/` (hidden on the share);
an archive inside it, one level deep, into `.unpacked/<rel>/.unpacked/<member>/`; deeper ones
are quarantined. From there on its files are files of the folder like any other: validated,
stamped in place, sent, verified, archived under `ARCHIVE_DIR/<ts>/<folder>/.unpacked/<rel>/`
or quarantined one by one; the receipt names each one's archive and member. An archive that
breaks a rule of extract.py is quarantined with the reason; one that looks damaged waits
while it is younger than INCOMPLETE_GRACE (a copy still arriving), like any file.

Crash-safe: an archive is unpacked into `.unpacked/.partial-<hash>/` (never taken: each run
removes such folders first), every file fsynced; then its state — the archive's identity, where
its tree lies, what became of nested archives — is written ahead in
`STATE_DIR/unpacked/<folder>.json`, and only then is the folder renamed into place. A tree is
used only while its state matches the archive as it is now; otherwise it is unpacked again.
The original archive is only ever read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from importer.archive import free_name, fsync_dir
from importer.config import Settings
from importer.extract import HINT, Budget, Damaged, Refused, extract, is_tar
from importer.folders import display
from importer.logs import event, warn
from importer.model import Folder, SourceFile, folder_hash
from importer.share import Identity, changed_since, identity, read_head, share_time
from importer.sniff import HEAD_BYTES, UNPACKED, archive_format

WORK = ".unpacked"
PARTIAL = ".partial-"
_NOT_ARCHIVES = (".dcm", ".dicom")  # not even sniffed: a large folder's files cost no read


def unpack_archives(folders: list[Folder], settings: Settings) -> None:
    """Unpack the settled archives of these folders (locked by the caller) and add their
    files to each folder; called once the batch knows which files are settled."""
    if settings.dry_run:
        return  # writes nothing: archives show as "not unpacked"
    for folder in folders:
        unpacker = _Unpacker(folder, settings)
        try:
            unpacker.run()
        except OSError as exc:  # the disk, not the archive: everything of it waits
            warn("%s: cannot unpack its archives now: %s", display(folder.name), exc)
            unpacker.wait(f"cannot unpack now: {exc.strerror or exc}")


def state_path(settings: Settings, folder_name: str) -> Path:
    return settings.state_dir / "unpacked" / f"{folder_hash(folder_name)}.json"


class _Unpacker:
    """One folder's archives and the trees unpacked from them."""

    def __init__(self, folder: Folder, settings: Settings) -> None:
        self.folder, self.settings = folder, settings
        self.work = folder.path / WORK
        self.state_file = state_path(settings, folder.name)
        self.state: dict[str, dict[str, Any]] = _load(self.state_file)

    def run(self) -> None:
        folder = self.folder
        archives = list(self._archives())
        if os.path.lexists(self.work) and not stat.S_ISDIR(os.lstat(self.work).st_mode):
            for source, _fmt in archives:
                self._set_aside(source, folder.pending, f"cannot unpack: {WORK} in the folder is"
                                " not a folder (a link?); rename it")
            return
        if self.work.is_dir():
            with os.scandir(self.work) as entries:
                for entry in entries:
                    if entry.name.startswith(PARTIAL):  # a run stopped half-way: never taken
                        _remove(entry.path)
        self._drop_stale()
        self._forget_listed()
        for source, fmt in archives:
            entry = self.state.get(source.rel)
            unpacked = entry is not None and (folder.path / entry["tree"]).is_dir()
            if not unpacked and not self._unpack(source, fmt):
                continue  # quarantined, waiting, or left for retry
            folder.files.remove(source)
            folder.unsent.append(source)  # archived as it came, with the folder
            folder.unsent_kinds[source.path] = UNPACKED
        for rel in list(self.state):
            self._take(rel)
        _save(self.state_file, self.folder.name, self.state)

    def wait(self, why: str) -> None:
        """Nothing of an archive of this folder goes in this run: archives and working
        folder alike are left for the next one."""
        folder, prefix = self.folder, str(self.work) + os.sep
        for source, _fmt in self._archives():
            self._set_aside(source, folder.pending, why)
        folder.files = [f for f in folder.files if not f.path.startswith(prefix)]
        for path in [p for p in folder.members if p in folder.to_quarantine]:
            del folder.to_quarantine[path]
        for source in folder.unsent:
            if folder.unsent_kinds.get(source.path) == UNPACKED and not source.path.startswith(
                    prefix):
                folder.pending[source.path] = why  # unpacked before the failure: waits too
        folder.unsent = [f for f in folder.unsent if not f.path.startswith(prefix)
                         and folder.unsent_kinds.get(f.path) != UNPACKED]
        folder.members = {}

    def _archives(self) -> list[tuple[SourceFile, str]]:
        """Settled files of the folder (outside our working folder) that are archives."""
        found = []
        for source in self.folder.files:
            if source.rel.startswith(WORK + os.sep):
                continue
            if (fmt := _archive_at(source.path, source.rel)) is not None:
                found.append((source, fmt))
        return found

    def _drop_stale(self) -> None:
        """Trees of an archive replaced since are removed (unpacked again); entries whose
        archive and tree are both gone (archived) are forgotten."""
        for rel, entry in list(self.state.items()):
            tree = self.folder.path / entry["tree"]
            now = identity(str(self.folder.path / rel))
            if now is None and tree.is_dir():
                continue  # the archive went ahead (archived): its files still go on
            if now is not None and [now.dev, now.ino, now.size, now.mtime_ns] == entry["ident"]:
                continue
            if tree.is_dir() and not tree.is_symlink():
                _remove(str(tree))
            del self.state[rel]

    def _forget_listed(self) -> None:
        """The listing saw our trees' files as plain files (perhaps too young to take):
        they are listed again by _take, as members."""
        prefixes = tuple(str(self.folder.path / entry["tree"]) + os.sep
                         for entry in self.state.values()) + (str(self.work / PARTIAL),)
        folder = self.folder
        folder.files = [f for f in folder.files if not f.path.startswith(prefixes)]
        for path in [p for p in folder.writing if p.startswith(prefixes)]:
            del folder.writing[path]
        folder.left = [(rel, why) for rel, why in folder.left
                       if not str(folder.path / rel).startswith(prefixes)]

    def _unpack(self, source: SourceFile, fmt: str) -> bool:
        """Unpack one archive into a partial folder, then (state written ahead) into place."""
        folder, settings = self.folder, self.settings
        self.work.mkdir(mode=0o755, exist_ok=True)
        partial = self.work / f"{PARTIAL}{folder_hash(source.rel)}"
        _remove(str(partial))
        budget = Budget(settings.unpack_max_files, settings.unpack_max_bytes,
                        settings.unpack_max_ratio)
        started = time.monotonic()
        try:
            unpacked = extract(source.path, str(partial), fmt, budget)
            inner = _nested(partial, unpacked.files, budget)
        except Refused as exc:
            _remove(str(partial))
            self._set_aside(source, folder.to_quarantine,
                            f"archive not unpacked: {exc}; nothing of it was sent{HINT}")
            return False
        except Damaged as exc:
            _remove(str(partial))
            age = share_time(settings.import_dir) - source.ident.changed_at()
            if age < settings.incomplete_grace:
                self._set_aside(source, folder.writing, f"incomplete: {exc}")
            else:
                self._set_aside(source, folder.to_quarantine,
                                f"archive not unpacked: {exc}; nothing of it was sent{HINT}")
            return False
        except OSError as exc:
            _remove(str(partial))
            self._set_aside(source, folder.pending, f"cannot unpack now: {exc.strerror or exc}")
            return False
        if why := changed_since(source.path, source.ident):
            _remove(str(partial))
            self._set_aside(source, folder.writing, f"still being written: {why} while"
                            " being unpacked")
            return False
        tree = free_name(self.work / source.rel)  # a folder of that name not ours stays
        ident = source.ident
        self.state[source.rel] = {"ident": [ident.dev, ident.ino, ident.size, ident.mtime_ns],
                                  "tree": os.path.relpath(tree, folder.path), "inner": inner}
        _save(self.state_file, folder.name, self.state)  # ahead of the rename
        tree.parent.mkdir(parents=True, exist_ok=True)
        os.rename(partial, tree)
        fsync_dir(tree.parent)
        event("INFO", "%s/%s: unpacked %d files (%d bytes) in %.2f s%s", display(folder.name),
              display(source.rel), budget.files, budget.bytes, time.monotonic() - started,
              f"; {len(inner)} archives inside" if inner else "")
        return True

    def _set_aside(self, source: SourceFile, where: dict[str, str], why: str) -> None:
        self.folder.files = [f for f in self.folder.files if f.path != source.path]
        where[source.path] = why

    def _take(self, rel: str) -> None:
        """The files of one tree join the folder, each knowing its archive and member."""
        folder, entry = self.folder, self.state[rel]
        tree = folder.path / entry["tree"]
        inner: dict[str, str | None] = entry["inner"]
        for dirpath, dirnames, filenames in os.walk(tree, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    source = SourceFile(path, os.path.relpath(path, folder.path), Identity.of(st))
                    member = os.path.relpath(path, tree).replace(os.sep, "/")
                    folder.members[path] = _origin(rel, member, inner)
                    if member not in inner:
                        folder.files.append(source)
                    elif (reason := inner[member]) is not None:
                        folder.to_quarantine[path] = reason
                    else:
                        folder.unsent.append(source)
                        folder.unsent_kinds[path] = UNPACKED


def _origin(rel: str, member: str, inner: dict[str, str | None]) -> dict[str, str]:
    """Where an unpacked file came from, for the receipt."""
    for name, reason in inner.items():
        prefix = f"{WORK}/{name}/"
        if reason is None and member.startswith(prefix):
            return {"archive": rel, "inner_archive": name, "member": member[len(prefix):]}
    return {"archive": rel, "member": member}


def _nested(partial: Path, files: list[str], budget: Budget) -> dict[str, str | None]:
    """Archives among the unpacked files: unpacked too, one level deep (None), or the
    reason each is quarantined; files of a nested archive that are archives again are
    quarantined. Keys: paths inside the tree."""
    inner: dict[str, str | None] = {}
    for rel in files:
        fmt = _archive_at(str(partial / rel), rel)
        if fmt is None:
            continue
        dest = partial / WORK / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            deeper = extract(str(partial / rel), str(dest), fmt, budget)
        except (Refused, Damaged) as exc:
            _remove(str(dest))
            inner[rel] = f"nested archive not unpacked: {exc}; nothing of it was sent{HINT}"
            continue
        inner[rel] = None
        for deep in deeper.files:
            if _archive_at(str(dest / deep), deep) is not None:
                inner[f"{WORK}/{rel}/{deep}"] = (
                    "an archive inside an archive inside an archive: only one level of"
                    f" nesting is unpacked; nothing of it was sent{HINT}")
    return inner


def _archive_at(path: str, rel: str) -> str | None:
    if rel.lower().endswith(_NOT_ARCHIVES):
        return None
    fmt = archive_format(read_head(path, HEAD_BYTES) or b"")
    return fmt if fmt is not None and (fmt == "ZIP" or is_tar(path, fmt)) else None


def _remove(path: str) -> None:
    """A working folder of ours (never through a link)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["archives"]
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, OSError) as exc:
        warn("%s is unreadable (%s): its archives are unpacked again", path, exc)
        return {}


def _save(path: Path, folder_name: str, archives: dict[str, dict[str, Any]]) -> None:
    if not archives:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as fh:
        json.dump({"folder": folder_name, "archives": archives}, fh, ensure_ascii=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def forget_gone(settings: Settings) -> None:
    """States of folders no longer in the import dir (all archived) are forgotten: once a
    batch, before its folders are listed."""
    for path in (settings.state_dir / "unpacked").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            name = json.loads(path.read_text(encoding="utf-8"))["folder"]
            if not (settings.import_dir / name).exists():
                path.unlink()
