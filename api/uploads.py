"""Taking an uploaded file from the request into the artifact store, validated, or not at all."""

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile

from api.config import Settings
from api.problems import Problem
from storage.artifacts import ArtifactStore
from storage.ingest import IngestError, TensorFileInfo, inspect_upload

CHUNK = 1024 * 1024


@dataclass
class StoredFile:
    info: TensorFileInfo
    sha256: str
    size_bytes: int
    object_key: str

    def tensor_table(self) -> dict:
        return {name: {"dtype": self.info.dtypes[name], "shape": list(shape)} for name, shape in self.info.shapes.items()}


def too_large(limit: int) -> Problem:
    return Problem(413, "Upload too large", f"The file exceeds the limit of {limit} bytes (REBASIN_MAX_UPLOAD_BYTES).")


def _copy_bounded(upload: UploadFile, path: Path, limit: int) -> None:
    size = 0
    with open(path, "wb") as out:
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            out.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def stored_upload(upload: UploadFile, settings: Settings, store: ArtifactStore, key: str, check=None):
    """Validate the upload and put it at ``key``; the object is removed again if the caller fails."""
    workdir = Path(tempfile.mkdtemp(prefix="rebasin-upload-"))
    try:
        _copy_bounded(upload, workdir / "upload", settings.max_upload_bytes)
        try:
            info = inspect_upload(workdir / "upload", workdir / "converted.safetensors")
            if check is not None:
                check(info)
        except IngestError as error:
            raise Problem(422, "Invalid file", str(error), kind="invalid-file") from None
        stored = StoredFile(info, _sha256(info.path), info.path.stat().st_size, key)
        store.put_file(key, info.path)
        try:
            yield stored
        except BaseException:
            store.delete(key)
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
