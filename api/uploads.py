"""Taking an uploaded file from the request into the artifact store, validated, or not at all.

The request body is parsed as it arrives (python-multipart's streaming parser): the ``file`` part goes
straight into one staging file, hashed (sha256) and counted against ``REBASIN_MAX_UPLOAD_BYTES`` on the
way, so the API process holds at most about one chunk of it in memory. Only a file that passes
validation is committed to the store (by rename when the store is a local directory on the same disk),
under a content-addressed key, in the same transaction that creates its record.
"""

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from core.config import Settings
from api import quotas
from api.problems import Problem
from storage.archives import ArchiveLimits
from storage.artifacts import ArtifactStore, sha256_file
from storage.ingest import IngestError, TensorFileInfo, check_dataset, inspect_upload
from storage.models import Blob, Checkpoint, Dataset, new_id
from storage.objects import add_reference, content_key, undo_reference

CHUNK = 1024 * 1024
MAX_FORM_FIELD_BYTES = 1024  # the ``name`` field


@dataclass(frozen=True)
class ResourceKind:
    """What an upload becomes: a checkpoint or a dataset."""

    noun: str
    path: str  # URL segment and OpenAPI tag
    model: type
    id_prefix: str
    check: Callable[[TensorFileInfo], object] | None  # extra validation beyond "a sane tensor file"
    fields: Callable[[TensorFileInfo], dict]  # the model's kind-specific columns


KINDS = {
    "checkpoint": ResourceKind(
        "checkpoint", "checkpoints", Checkpoint, "ckpt", None, lambda info: {"num_parameters": info.num_parameters}
    ),
    "dataset": ResourceKind(
        "dataset", "datasets", Dataset, "ds", check_dataset, lambda info: {"num_examples": info.shapes["targets"][0]}
    ),
}


def too_large(limit: int) -> Problem:
    return Problem(413, "Upload too large", f"The file exceeds the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES).")


@contextmanager
def staging_workdir(store: ArtifactStore, settings: Settings) -> Iterator[Path]:
    """A private directory for one upload, removed afterwards; what a crash leaves is swept later."""
    root = store.staging_dir() or (settings.data_dir / "staging").resolve()
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class ReceivedFile:
    path: Path
    sha256: str
    size_bytes: int
    filename: str | None = None


class HashingFileWriter:
    """Writes bytes to a file while hashing and counting them; refuses to pass ``limit``."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def check_size(self, extra: int) -> None:
        if self.size + extra > self.limit:
            raise too_large(self.limit)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.check_size(len(data))
        self.handle.write(data)
        self.digest.update(data)  # hashlib releases the GIL for large buffers: worth a thread
        self.size += len(data)

    def close(self) -> ReceivedFile:
        self.handle.close()
        return ReceivedFile(self.path, self.digest.hexdigest(), self.size)

    def discard(self) -> None:
        self.handle.close()
        self.path.unlink(missing_ok=True)


class _MultipartForm:
    """Callbacks for python-multipart: the ``file`` part into a buffer flushed to disk, ``name`` kept small."""

    def __init__(self, writer: HashingFileWriter):
        self.writer = writer
        self.pending = bytearray()  # file bytes parsed but not yet written (flushed off the event loop)
        self.name: str | None = None
        self.filename: str | None = None
        self.files_seen = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._target: str | None = None
        self._field = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers, self._target = {}, None

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field == "file":
            self.files_seen += 1
            if self.files_seen > 1:
                raise Problem(422, "Invalid request", "file: send exactly one file per upload", kind="validation")
            if b"filename" in options:
                self.filename = Path(options[b"filename"].decode("utf-8", "replace")).name or None
            self._target = "file"
        elif field == "name":
            self._target = "name"
            self._field.clear()
        # Other fields are ignored, as a form parser would.

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            self.writer.check_size(len(self.pending) + end - start)  # fail fast, before buffering more
            self.pending.extend(data[start:end])
        elif self._target == "name":
            if len(self._field) + end - start > MAX_FORM_FIELD_BYTES:
                raise Problem(422, "Invalid request", "name: at most 255 characters", kind="validation")
            self._field.extend(data[start:end])

    def on_part_end(self) -> None:
        if self._target == "name":
            name = self._field.decode("utf-8", "replace").strip()
            if len(name) > 255:
                raise Problem(422, "Invalid request", "name: at most 255 characters", kind="validation")
            self.name = name or None
        self._target = None


async def receive_multipart_file(request: Request, path: Path, limit: int) -> tuple[ReceivedFile, str | None]:
    """Stream the ``file`` field of a multipart/form-data body into ``path``; returns it and the ``name`` field."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise Problem(415, "Unsupported media type", "Send the file as multipart/form-data with a field 'file'.")
    writer = HashingFileWriter(path, limit)
    form = _MultipartForm(writer)
    try:
        parser = MultipartParser(params[b"boundary"], form.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if len(form.pending) >= CHUNK:
                data, form.pending = form.pending, bytearray()
                await run_in_threadpool(writer.write, data)
        parser.finalize()
        if form.pending:
            await run_in_threadpool(writer.write, form.pending)
    except ClientDisconnect:
        writer.discard()
        raise Problem(400, "Upload interrupted", "The client disconnected before the upload was complete.") from None
    except Problem:
        writer.discard()
        raise
    except Exception as error:  # python-multipart's parse errors
        writer.discard()
        raise Problem(400, "Malformed multipart body", str(error)[:300], kind="malformed-body") from None
    if form.files_seen == 0:
        writer.discard()
        raise Problem(422, "Invalid request", "file: Field required", kind="validation")
    received = writer.close()
    received.filename = form.filename
    return received, form.name


def validate_file(kind: ResourceKind, path: Path, workdir: Path, settings: Settings) -> TensorFileInfo:
    """Ingest checks for one kind; a PyTorch file or a model folder's archive comes back converted (``info.path``
    differs). Checkpoints may be model folders, datasets not."""
    folders = None
    if kind.noun == "checkpoint":
        folders = ArchiveLimits(settings.archive_max_members, settings.archive_max_unpacked_bytes)
    try:
        info = inspect_upload(path, workdir / "converted.safetensors", folders)
        if kind.check is not None:
            kind.check(info)
    except IngestError as error:
        raise Problem(422, "Invalid file", str(error), kind="invalid-file") from None
    return info


def create_resource(
    session: Session,
    store: ArtifactStore,
    tenant: str,
    kind: ResourceKind,
    info: TensorFileInfo,
    original: ReceivedFile,
    name: str,
    write_original: Callable[[str], None] | None = None,
    settings: Settings | None = None,
):
    """Commit the validated bytes (content-addressed) and the record together; on failure neither remains.

    ``write_original(key)`` puts the uploaded file's bytes at ``key`` (default: move the staging file);
    a converted PyTorch file is always moved from its staging path.
    """
    if info.path == original.path:
        sha256, size = original.sha256, original.size_bytes
        write = write_original or (lambda key: store.move_file(key, original.path))
    else:
        # A model folder keeps the sha256 of the archive the user sent (its normalisation is deterministic, so
        # the same archive is still stored once); a converted PyTorch file is named by what is stored.
        sha256 = original.sha256 if info.format == "hf-folder" else sha256_file(info.path)
        size = info.path.stat().st_size
        write = lambda key: store.move_file(key, info.path)  # noqa: E731
    resource_id = new_id(kind.id_prefix)
    process_lock = None
    try:
        if settings is not None and settings.tenant_max_stored_bytes > 0:
            # Checked again under the tenant's lock with the bytes this adds: concurrent uploads, each within the
            # quota on its own (checked when they started), cannot together pass it.
            process_lock = quotas.lock_tenant(session, tenant)
            known = session.get(Blob, content_key(tenant, sha256)) is not None
            quotas.check_storage(session, tenant, settings, 0 if known else size)
        key, wrote = add_reference(session, store, tenant, sha256, size, write)
        try:
            row = kind.model(
                id=resource_id,
                tenant=tenant,
                name=name or resource_id,
                sha256=sha256,
                size_bytes=size,
                format=info.format,
                num_tensors=info.num_tensors,
                tensors={n: {"dtype": info.dtypes[n], "shape": list(s)} for n, s in info.shapes.items()},
                object_key=key,
                **kind.fields(info),
            )
            session.add(row)
            session.commit()
        except BaseException:
            undo_reference(store, key, wrote)
            raise
    except BaseException:
        session.rollback()
        raise
    finally:
        if process_lock is not None:
            process_lock.release()
    return row
