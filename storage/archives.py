"""Unpacking an uploaded model folder (one ``.tar``, ``.tar.gz`` or ``.zip``) into a private directory, or refusing it.

Nothing in an archive is trusted: every member is checked before a byte of it is written, and only regular
files are ever created, by this code (never by ``tarfile``/``zipfile``'s own extraction). Refused: absolute
paths, ``..``, links, devices and every other special member, a name that appears twice, encrypted zip members,
more than ``max_members`` members, and more than ``max_unpacked_bytes`` bytes unpacked in all (a member's
declared size is checked before it is read, and no more than that is ever read from it). The folder may lie at
the archive's top level or inside one top folder (as ``tar -cf model.tar model/`` writes it).
"""

from __future__ import annotations

import gzip
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage.ingest import IngestError

CHUNK = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
FOLDER_MARKER = "config.json"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 10_000
    max_unpacked_bytes: int = 32 * 1024**3


def archive_kind(path: Path) -> str | None:
    """``tar``, ``tar.gz`` or ``zip`` when the file is an archive of a model folder; None for anything else (a
    torch.save zip holds no config.json, so it stays a PyTorch state dict)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(GZIP_MAGIC):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # left to the PyTorch reader, which says what is wrong
        if any(PurePosixPath(n).name == FOLDER_MARKER and len(PurePosixPath(n).parts) <= 2 for n in names):
            return "zip"
    return None


def _relative(name: str) -> PurePosixPath | None:
    """The member's path inside the archive, checked; None for the archive's top itself (``.``, ``./``)."""
    if "\\" in name or "\x00" in name:
        raise IngestError(f"archive member {name[:100]!r}: backslashes and NUL are not allowed in names")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise IngestError(f"archive member {name[:100]!r} has an absolute path")
    if ".." in path.parts:
        raise IngestError(f"archive member {name[:100]!r} leads out of the folder ('..')")
    parts = [p for p in path.parts if p != "."]
    return PurePosixPath(*parts) if parts else None


class _Unpacker:
    def __init__(self, dest: Path, limits: ArchiveLimits):
        self.dest, self.limits = dest, limits
        self.members = self.unpacked = 0
        self.seen: set[PurePosixPath] = set()

    def count(self, name: str) -> PurePosixPath | None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise IngestError(f"the archive has more than {self.limits.max_members} members (REBASIN_ARCHIVE_MAX_MEMBERS)")
        return _relative(name)

    def file(self, relative: PurePosixPath | None, size: int, source) -> None:
        """Write one regular member of the declared ``size`` from the readable ``source``."""
        if relative is None:
            raise IngestError("an archive member that is a file has no name")
        if relative in self.seen:
            raise IngestError(f"archive member {str(relative)[:100]!r} appears twice")
        self.seen.add(relative)
        if self.unpacked + size > self.limits.max_unpacked_bytes:
            raise IngestError(f"archive member {str(relative)[:100]!r} ({size} bytes) takes the unpacked folder past "
                              f"the limit of {self.limits.max_unpacked_bytes} bytes (REBASIN_ARCHIVE_MAX_UNPACKED_BYTES)")
        self.unpacked += size
        if len(relative.parts) > 2:  # deeper than the folder itself (a top folder, then its files): not read
            return
        target = self.dest.joinpath(*relative.parts)
        if target.parent != self.dest and target.parent.exists() and not target.parent.is_dir():
            raise IngestError(f"archive member {str(relative)[:100]!r} lies inside a file")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IngestError(f"archive member {str(relative)[:100]!r} is both a file and a folder")
        remaining = size
        with open(target, "wb") as out:
            while remaining:
                chunk = source.read(min(CHUNK, remaining))
                if not chunk:
                    raise IngestError(f"archive member {str(relative)[:100]!r} is truncated")
                out.write(chunk)
                remaining -= len(chunk)
            if source.read(1):
                raise IngestError(f"archive member {str(relative)[:100]!r} holds more than its declared size")


def _unpack_tar(path: Path, unpacker: _Unpacker) -> None:
    try:
        with tarfile.open(path, mode="r|*") as archive:  # a stream: one pass, members never seeked back to
            for member in archive:
                relative = unpacker.count(member.name)
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    raise IngestError(f"archive member {member.name[:100]!r} is a link: send the files themselves")
                if not member.isreg():
                    raise IngestError(f"archive member {member.name[:100]!r} is not a regular file (a device, FIFO "
                                      "or other special file)")
                unpacker.file(relative, member.size, archive.extractfile(member))
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise IngestError(f"the archive is damaged or not a tar archive ({str(error)[:200]})") from None


def _unpack_zip(path: Path, unpacker: _Unpacker) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > unpacker.limits.max_members:
                raise IngestError(f"the archive has more than {unpacker.limits.max_members} members "
                                  "(REBASIN_ARCHIVE_MAX_MEMBERS)")
            for info in infos:
                relative = unpacker.count(info.filename)
                mode = info.external_attr >> 16
                if info.is_dir():
                    continue
                if stat.S_ISLNK(mode):
                    raise IngestError(f"archive member {info.filename[:100]!r} is a link: send the files themselves")
                if mode and not stat.S_ISREG(mode):
                    raise IngestError(f"archive member {info.filename[:100]!r} is not a regular file")
                if info.flag_bits & 0x1:
                    raise IngestError(f"archive member {info.filename[:100]!r} is encrypted")
                with archive.open(info) as source:
                    unpacker.file(relative, info.file_size, source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error) as error:
        raise IngestError(f"the zip archive is damaged or uses an unsupported feature ({str(error)[:200]})") from None


def unpack_folder(path: Path, dest: Path, kind: str, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Unpack the archive into the empty directory ``dest``; returns the model folder in it (``dest`` or its one
    top folder). On refusal, IngestError (``dest`` may hold part of it: the caller's staging area is removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    unpacker = _Unpacker(dest, limits)
    (_unpack_zip if kind == "zip" else _unpack_tar)(path, unpacker)
    if (dest / FOLDER_MARKER).is_file():
        return dest
    tops = [p for p in dest.iterdir() if p.is_dir() and (p / FOLDER_MARKER).is_file()]
    if len(tops) == 1:
        return tops[0]
    raise IngestError("the archive holds no model folder: config.json and the weights must lie at its top level or "
                      "inside one top folder")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
