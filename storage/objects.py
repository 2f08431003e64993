"""Content-addressed objects: identical bytes are stored once per tenant and deleted with their last reference.

Keys are ``objects/<tenant>/<sha256[:2]>/<sha256>.safetensors``. The tenant is part of the key so that
one tenant's upload can never make another tenant's bytes reachable (or reveal, through a fast
duplicate upload, that someone else holds them).

Adding and dropping references both lock the ``blobs`` row for the key first, so that an upload of
the same bytes cannot slip between "no references left" and "delete the object".
"""

import hashlib
import re
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.artifacts import ArtifactStore
from storage.models import Blob, Checkpoint, Dataset

OBJECTS_PREFIX = "objects/"
_PLAIN_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def tenant_namespace(tenant: str) -> str:
    """The tenant as a key segment: readable when it is a plain name, else a digest (never both forms)."""
    if _PLAIN_TENANT.fullmatch(tenant):
        return tenant
    return "_" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


def content_key(tenant: str, sha256: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{OBJECTS_PREFIX}{tenant_namespace(tenant)}/{sha256[:2]}/{sha256}.safetensors"


def _lock_blob(session: Session, key: str) -> Blob | None:
    return session.scalars(select(Blob).where(Blob.object_key == key).with_for_update()).one_or_none()


def add_reference(
    session: Session, store: ArtifactStore, tenant: str, sha256: str, size_bytes: int, write: Callable[[str], None]
) -> tuple[str, bool]:
    """Make sure the tenant's object for these bytes exists; returns (key, whether we wrote it).

    ``write(key)`` puts the bytes at ``key``; it is only called when the object is not there yet.
    The caller must add its referencing row and commit in this same transaction; if that fails, it
    calls ``undo_reference`` before rolling back, so that an object we wrote leaks nowhere.
    """
    key = content_key(tenant, sha256)
    values = {"object_key": key, "tenant": tenant, "sha256": sha256, "size_bytes": size_bytes}
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise RuntimeError(f"content addressing supports PostgreSQL and SQLite, not {dialect}")
    # Insert-if-missing, then lock: two concurrent first uploads cannot both create the row.
    session.execute(insert(Blob).values(**values).on_conflict_do_nothing(index_elements=["object_key"]))
    _lock_blob(session, key)
    if store.exists(key):
        return key, False
    write(key)
    return key, True


def undo_reference(store: ArtifactStore, key: str, wrote: bool) -> None:
    """Before rolling back a failed add_reference: remove the object if this transaction created it."""
    if wrote:
        # We still hold the blob lock and our row insert is rolled back next, so nobody else refers to it.
        store.delete(key)


def references(session: Session, key: str) -> int:
    return sum(session.scalar(select(func.count()).where(model.object_key == key)) for model in (Checkpoint, Dataset))


def delete_referencing_row(session: Session, store: ArtifactStore, row: Checkpoint | Dataset) -> None:
    """Delete a checkpoint or dataset row and commit; its bytes go too when nothing else refers to them."""
    key = row.object_key
    _lock_blob(session, key)
    session.delete(row)
    session.flush()
    if references(session, key) == 0:
        blob = session.get(Blob, key)
        if blob is not None:
            session.delete(blob)
            session.flush()
        # Deleted while the lock is held: an upload of the same bytes waits, then finds no object and writes it.
        store.delete(key)
    session.commit()
