"""Artifact store: where checkpoint, dataset and job-output bytes live.

Two backends behind one small interface: a local directory (``file://``) and
any S3-compatible endpoint (``s3://bucket/prefix``). Writes are atomic: a
reader sees a whole object or none (a local temporary file renamed into place;
on S3 a single PUT or a completed multipart upload). What a crash leaves
behind (local ``.tmp-*`` files and staging files, incomplete S3 multipart
uploads) is invisible to readers and removed by ``sweep``.
"""

import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse


TEMP_PREFIX = ".tmp-"
DIRECT_UPLOADS_PREFIX = "uploads/"  # keys that presigned multipart uploads assemble at
STAGING_DIR = ".staging"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def move_file(self, key: str, path: Path) -> None:
        """Like put_file, but the source file is consumed (a rename when the store is on the same disk)."""
    def copy(self, source_key: str, key: str) -> None: ...
    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified epoch seconds) of the committed objects whose key starts with ``prefix``."""
    def staging_dir(self) -> Path | None:
        """Where uploads should be received so that committing them is cheap; None: anywhere."""
    def sweep(self, older_than_s: float) -> int:
        """Remove abandoned temporaries older than this; returns how many."""
    def get_file(self, key: str, path: Path) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def local_path(self, key: str) -> Path | None:
        """A path to serve the object from directly, when the store is a local directory."""
    def presigned_get_url(self, key: str, filename: str, expires_s: int = 300) -> str | None:
        """A short-lived download URL, when the store can hand one out."""
    def check(self) -> None:
        """Raise when the store is not usable (readiness)."""


class LocalStore:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or any(part.startswith(".") for part in key.split("/")):
            # Dot names are the store's own temporaries and staging area, never objects.
            raise ValueError(f"invalid object key: {key!r}")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # The rename itself is only durable once the directory entry is on disk.
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._fsync_dir(target.parent)

    def move_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            os.replace(path, target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            self.put_file(key, path)  # another file system: copy, then drop the source
            Path(path).unlink()
            return
        self._fsync_dir(target.parent)

    def copy(self, source_key: str, key: str) -> None:
        self.put_file(key, self._path(source_key))

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(directory, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        yield key, path.stat().st_mtime
                    except FileNotFoundError:
                        continue

    def staging_dir(self) -> Path | None:
        # Inside the root, so that committing a received upload is a rename, not a copy.
        path = self.root / STAGING_DIR
        path.mkdir(exist_ok=True)
        return path

    def sweep(self, older_than_s: float) -> int:
        return sweep_local_temporaries(self.root, older_than_s)

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def presigned_get_url(self, key: str, filename: str, expires_s: int = 300) -> str | None:
        return None

    def check(self) -> None:
        probe = self.root / ".readyz"
        probe.write_bytes(b"ok")
        probe.unlink()


S3_MAX_ATTEMPTS = 10


S3_PART_BYTES = 8 * 1024**2
S3_TRANSFER_THREADS = 4
S3_DOWNLOAD_QUEUE_CHUNKS = 16


def transfer_config():
    """Memory of a transfer, whatever the object's size: at most ``S3_TRANSFER_THREADS`` parts in flight on
    upload; on download, the ranged GETs' chunks wait in a queue of ``S3_DOWNLOAD_QUEUE_CHUNKS`` x 256 KiB
    for the writer (boto3's default of 100 let a slow disk or a loaded machine hold 25 MiB more)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=S3_PART_BYTES, multipart_chunksize=S3_PART_BYTES,
                          max_concurrency=S3_TRANSFER_THREADS, max_io_queue=S3_DOWNLOAD_QUEUE_CHUNKS)


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, max_attempts: int = S3_MAX_ATTEMPTS):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Standard mode retries 500/502/503/504, throttling (SlowDown) and dropped connections with
        # exponential backoff and jitter. Every part of a multipart transfer is retried on its own, and an
        # object becomes visible only when its upload completes: a failed write leaves nothing half-visible.
        retries = {"mode": "standard", "max_attempts": max_attempts}
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4", retries=retries))
        self.transfer = transfer_config()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> None:
        # upload_file switches to multipart for large files; an object only
        # becomes visible when the (multipart) upload completes. It reads the file part by part (8 MiB
        # parts, parts grown to stay under 10000): memory stays at the parts in flight, whatever the
        # size (see transfer_config; measured +11 MiB for 64 MiB at load 6, tests/test_storage_store.py).
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def move_file(self, key: str, path: Path) -> None:
        self.put_file(key, path)
        Path(path).unlink()

    def copy(self, source_key: str, key: str) -> None:
        # Server-side; the managed copy turns into a multipart copy for large objects, visible when complete.
        self.client.copy({"Bucket": self.bucket, "Key": self._key(source_key)}, self.bucket, self._key(key))

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        strip = len(self._key(""))
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"][strip:], item["LastModified"].timestamp()

    def staging_dir(self) -> Path | None:
        return None

    def sweep(self, older_than_s: float) -> int:
        """Abort the incomplete multipart uploads under our prefix that were started long enough ago.

        These are what an API process that died while copying an upload to S3 leaves. Direct uploads
        (under ``DIRECT_UPLOADS_PREFIX``) are left alone: their database records say whether they are
        still live (see storage.housekeeping), and some S3-compatible servers (moto) report a fake
        ``Initiated`` time, which must not abort a client's upload in progress.
        """
        cutoff = time.time() - older_than_s
        aborted = 0
        for key, upload_id, initiated in self.list_multipart(""):
            if not key.startswith(DIRECT_UPLOADS_PREFIX) and initiated < cutoff:
                self.abort_multipart(key, upload_id)
                aborted += 1
        return aborted

    def list_multipart(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """(key, upload id, initiated epoch seconds) of the incomplete multipart uploads under ``prefix``."""
        strip = len(self._key(""))
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for upload in page.get("Uploads", []):
                yield upload["Key"][strip:], upload["UploadId"], upload["Initiated"].timestamp()

    # Direct (presigned) multipart uploads: the client sends the parts to S3 itself.

    def create_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))["UploadId"]

    def presigned_part_url(self, key: str, upload_id: str, part_number: int, expires_s: int) -> str:
        return self.client.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": self._key(key), "UploadId": upload_id, "PartNumber": part_number},
            ExpiresIn=expires_s,
        )

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self._key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": number, "ETag": etag} for number, etag in parts]},
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                raise

    def size(self, key: str) -> int:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]

    def get_file(self, key: str, path: Path) -> None:
        # Ranged GETs written into the file as they arrive (a temporary renamed at the end): bounded memory.
        self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def open(self, key: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def local_path(self, key: str) -> Path | None:
        return None

    def presigned_get_url(self, key: str, filename: str, expires_s: int = 300) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._key(key),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=expires_s,
        )

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def sweep_directory_entries(directory: Path, older_than_s: float) -> int:
    """Remove the entries of ``directory`` (files or trees) in which nothing changed for ``older_than_s``."""
    if not directory.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in directory.iterdir():
        try:
            newest = max([entry.lstat().st_mtime] + [p.lstat().st_mtime for p in entry.rglob("*")])
            if newest < cutoff:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # finished (or swept) while we looked
    return removed


def sweep_local_temporaries(root: Path, older_than_s: float) -> int:
    """Remove ``.tmp-*`` files and staging entries under ``root`` not touched for ``older_than_s`` seconds."""
    cutoff = time.time() - older_than_s
    removed = sweep_directory_entries(root / STAGING_DIR, older_than_s)
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != STAGING_DIR]
        for name in files:
            if name.startswith(TEMP_PREFIX):
                path = Path(directory, name)
                try:
                    if path.lstat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
    return removed


def open_store(uri: str, s3_endpoint_url: str | None = None, s3_max_attempts: int = S3_MAX_ATTEMPTS) -> ArtifactStore:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"artifact URI needs a bucket: {uri!r}")
        return S3Store(parsed.netloc, parsed.path, s3_endpoint_url, s3_max_attempts)
    raise ValueError(f"unsupported artifact URI {uri!r}: use file:///path or s3://bucket/prefix")
