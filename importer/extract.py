"""Unpack one ZIP or tar into a fresh directory, refusing what could harm the host.

Archives come from outside (a portal's download, an e-mail): a member path may point out of
the working folder (zip-slip: `../`, absolute, a drive letter, a link pointing out), an archive
may expand a thousandfold (a ZIP bomb) or hold more files than any study, a member may be
encrypted, and a copy may be cut short. Each rule broken raises Refused with a reason a
person can act on; a damaged archive raises Damaged (the caller tells a copy still arriving
from a broken one by its age). Only regular files and folders are written, with fixed
permissions, each file created exclusively, never through a link, and fsynced: the caller
renames the directory into place only once everything in it is complete. Standard library
only (zipfile, tarfile). No policy on what the files are: that is the pipeline's job.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import posixpath
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

CHUNK = 1 << 20
RATIO_FLOOR = 1 << 20  # below this many expanded bytes no ratio is judged: small is harmless
HINT = "; unpack it yourself, check what is inside, and drop those files into the folder"
# Errors that say nothing about the archive: the disk is full or failing. The archive waits.
TRANSIENT = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM))
_DAMAGE = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
           lzma.LZMAError, struct.error, OSError, ValueError)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {9: "Deflate64", 98: "PPMd", 93: "Zstandard", 95: "XZ", 99: "AES"}


class Refused(Exception):
    """The archive breaks a rule (the message names it): it is quarantined, nothing sent."""


class Damaged(Exception):
    """Corrupt or truncated (or still being written, if young)."""


@dataclass
class Budget:
    """What one dropped archive may write, nested archives included (UNPACK_MAX_*)."""

    max_files: int
    max_bytes: int
    max_ratio: int
    files: int = 0
    bytes: int = 0

    def file(self, name: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise Refused(f"more than UNPACK_MAX_FILES ({self.max_files}) files (at {name!r})")

    def grow(self, n: int, what: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise Refused(f"more than UNPACK_MAX_BYTES ({self.max_bytes} bytes) when unpacked"
                          f" (at {what!r})")

    def ratio(self, expanded: int, compressed: int, what: str) -> None:
        """A ZIP bomb: far more bytes out than in."""
        if expanded > RATIO_FLOOR and expanded > self.max_ratio * max(compressed, 1):
            raise Refused(f"compression ratio above UNPACK_MAX_RATIO ({self.max_ratio}:1):"
                          f" {what!r} expands {expanded} bytes from {compressed} (a ZIP bomb?)")


@dataclass
class Unpacked:
    """What one extraction wrote (paths relative to its directory, '/'-separated)."""

    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # links inside, devices: not written


def member_path(name: str) -> str:
    """A member's name as a safe relative path, or Refused: never absolute, never `..`."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise Refused(f"member path {name!r} is absolute: it would be written outside the"
                      " folder (zip-slip)")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"member path {name!r} climbs out with '..': it would be written outside"
                      " the folder (zip-slip)")
    # Control characters (a line break breaks every tool's output) become '_'; our own name
    # for working folders is not a member's to take.
    parts = ["".join("_" if ord(c) < 32 or c == "\x7f" else c for c in p) for p in parts]
    parts = ["_.unpacked" if p == ".unpacked" else p for p in parts]
    return "/".join(parts)


def _check_link(link: str, target: str, kind: str, *, from_root: bool = False) -> None:
    """A link that stays inside is harmless (it is not written); one pointing out is hostile.
    A symbolic link's target is relative to its folder, a hard link's to the archive's root."""
    base = "" if from_root else posixpath.dirname(link)
    where = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if target.startswith(("/", "\\")) or where == ".." or where.startswith("../"):
        raise Refused(f"{kind} {link!r} points outside the archive ({target!r})")


def extract(path: str, dest: str, fmt: str, budget: Budget) -> Unpacked:
    """Unpack the archive at path (fmt from sniff.archive_format) into dest (created)."""
    os.mkdir(dest, 0o755)
    try:
        if fmt == "ZIP":
            return _zip(path, dest, budget)
        return _tar(path, dest, budget)
    except (Refused, Damaged):
        raise
    except OSError as exc:
        if exc.errno in TRANSIENT or isinstance(exc, PermissionError):
            raise
        if exc.errno == errno.ENAMETOOLONG:
            raise Refused(f"a member name is too long for this file system ({exc})") from None
        raise Damaged(f"corrupt or truncated {fmt}: {exc}") from None
    except _DAMAGE as exc:
        raise Damaged(f"corrupt or truncated {fmt}: {exc}") from None


def _zip(path: str, dest: str, budget: Budget) -> Unpacked:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise Damaged(f"corrupt or truncated ZIP (no central directory: cut short?): {exc}") \
            from None
    out = Unpacked()
    with archive:
        infos = archive.infolist()
        plan: list[tuple[zipfile.ZipInfo, str]] = []
        declared = 0
        for info in infos:  # every rule first, from the central directory: nothing written yet
            rel = member_path(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                with archive.open(info) as link:
                    target = link.read(4096).decode("utf-8", "replace")
                _check_link(rel, target, "symbolic link")
                out.skipped.append(rel)
                continue
            if info.is_dir() or not rel:
                continue
            if info.flag_bits & 0x1:
                raise Refused(f"encrypted member {info.filename!r}: it cannot be read without"
                              " its password")
            if info.compress_type not in _ZIP_METHODS:
                method = _ZIP_METHOD_NAMES.get(info.compress_type, str(info.compress_type))
                raise Refused(f"member {info.filename!r} uses compression method {method},"
                              " which this importer cannot unpack")
            budget.file(info.filename)
            budget.ratio(info.file_size, info.compress_size, info.filename)
            declared += info.file_size
            plan.append((info, rel))
        _no_clashes([rel for _, rel in plan])
        budget.ratio(declared, os.path.getsize(path), "the archive as a whole")
        if budget.bytes + declared > budget.max_bytes:
            raise Refused(f"more than UNPACK_MAX_BYTES ({budget.max_bytes} bytes) when"
                          f" unpacked ({declared} bytes declared)")
        for info, rel in plan:
            try:
                with archive.open(info) as src:
                    _write(src, dest, rel, budget, compressed=info.compress_size)
            except RuntimeError as exc:  # zipfile: "... is encrypted, password required"
                raise Refused(f"encrypted member {info.filename!r}: {exc}") from None
            except NotImplementedError as exc:
                raise Refused(f"member {info.filename!r}: {exc}") from None
            out.files.append(rel)
    return out


def _tar(path: str, dest: str, budget: Budget) -> Unpacked:
    out = Unpacked()
    seen: set[str] = set()
    base = 0  # bytes this archive has expanded to so far: against the bytes read of it
    with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as archive:
        for member in archive:
            rel = member_path(member.name)
            if member.issym():
                _check_link(rel, member.linkname, "symbolic link")
                out.skipped.append(rel)
                continue
            if member.islnk():
                _check_link(rel, member.linkname, "hard link", from_root=True)
                target = member_path(member.linkname)
                if target not in seen:
                    raise Refused(f"hard link {member.name!r} points to {member.linkname!r},"
                                  " which is not a file of this archive")
                budget.file(member.name)
                with open(os.path.join(dest, *target.split("/")), "rb") as src:
                    base += _write(src, dest, rel, budget, compressed=None)
                out.files.append(rel)
                continue
            if member.isdir() or not rel:
                continue
            if not member.isreg():
                out.skipped.append(rel)  # a device, a FIFO: never written
                continue
            budget.file(member.name)
            if budget.bytes + member.size > budget.max_bytes:
                raise Refused(f"more than UNPACK_MAX_BYTES ({budget.max_bytes} bytes) when"
                              f" unpacked (at {member.name!r})")
            src = archive.extractfile(member)
            if src is None:
                continue
            if rel in seen:
                raise Refused(f"two members named {member.name!r}")
            _clash(rel, seen)
            with src:
                base += _write(src, dest, rel, budget, compressed=None, stream=(raw, base))
            seen.add(rel)
            out.files.append(rel)
    return out


def _no_clashes(rels: list[str]) -> None:
    seen: set[str] = set()
    for rel in rels:
        if rel in seen:
            raise Refused(f"two members named {rel!r}")
        _clash(rel, seen)
        seen.add(rel)


def _clash(rel: str, files: set[str]) -> None:
    """A path both a file and a folder (`a` and `a/b`): one of them would be lost."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in files:
            raise Refused(f"member {rel!r} lies inside {'/'.join(parts[:i])!r}, which is a file")
    if any(other.startswith(rel + "/") for other in files):
        raise Refused(f"member {rel!r} is both a file and a folder")


def _write(src: IO[bytes], dest: str, rel: str, budget: Budget, *, compressed: int | None,
           stream: tuple[IO[bytes], int] | None = None) -> int:
    """Copy one member, counting every byte against the budget as it comes (declared sizes
    may lie), then fsync it: a renamed tree holds only complete files. stream (a tar): the
    archive's file and what it expanded to before this member, for its ratio so far."""
    target = os.path.join(dest, *rel.split("/"))
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    written = 0
    with _exclusive(target) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            written += len(chunk)
            budget.grow(len(chunk), rel)
            if compressed is not None:
                budget.ratio(written, compressed, rel)
            elif stream is not None:  # a tar: bytes out against bytes read, so far
                budget.ratio(stream[1] + written, stream[0].tell(), "the archive as a whole")
        out.flush()
        os.fsync(out.fileno())
    return written


def is_tar(path: str, fmt: str) -> bool:
    """A gzip, bzip2 or xz file holds a tar (else it is one compressed file, not unpacked):
    its first 512 bytes, decompressed, are a tar header. Damaged: extract() says so."""
    opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}.get(fmt)
    if opener is None:
        return fmt == "tar"
    try:
        with opener(path, "rb") as fh:
            head = fh.read(512)
    except _DAMAGE:
        return True
    return head[257:262] == b"ustar"


@contextmanager
def _exclusive(target: str) -> Iterator[IO[bytes]]:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "wb") as out:
        yield out
