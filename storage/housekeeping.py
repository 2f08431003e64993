"""Removing what interrupted uploads leave behind: staging files, store temporaries, expired direct uploads.

Everything here is idempotent, so any number of API processes may run it at the same time.
"""

import logging
from pathlib import Path

from sqlalchemy import select

from storage.artifacts import DIRECT_UPLOADS_PREFIX, ArtifactStore, S3Store, sweep_directory_entries
from storage.db import session_scope
from storage.models import DirectUpload, utcnow

log = logging.getLogger("rebasin.storage")


def expire_direct_uploads(db_url: str, store: ArtifactStore) -> int:
    """Abort the direct uploads whose time ran out (never completed, or a completion that died midway)."""
    expired = 0
    with session_scope(db_url) as session:
        rows = session.scalars(
            select(DirectUpload).where(DirectUpload.status.in_(("pending", "completing")), DirectUpload.expires_at < utcnow())
        ).all()
        for row in rows:
            if isinstance(store, S3Store) and row.multipart_upload_id:
                store.abort_multipart(row.object_key, row.multipart_upload_id)
                store.delete(row.object_key)  # a completed-but-unvalidated object, if the API died after completing
            row.status = "expired"
            session.commit()
            expired += 1
        if isinstance(store, S3Store):
            # A multipart upload whose record is not live: aborted or expired while S3 was unreachable, or the
            # API died before saving its id. A record is committed before its multipart upload starts, so
            # listing the uploads *first* guarantees that every live one finds its record in the query after.
            uploads = list(store.list_multipart(DIRECT_UPLOADS_PREFIX))
            session.rollback()  # end any read snapshot (SQLite keeps one per transaction) so the query is fresh
            live = set(
                session.scalars(select(DirectUpload.object_key).where(DirectUpload.status.in_(("pending", "completing"))))
            )
            for key, upload_id, _ in uploads:
                if key not in live:
                    store.abort_multipart(key, upload_id)
                    expired += 1
    return expired


def sweep_storage(db_url: str, store: ArtifactStore, extra_staging_dir: Path | None, older_than_s: float) -> dict[str, int]:
    counts = {
        "direct_uploads_expired": expire_direct_uploads(db_url, store),
        "store_temporaries": store.sweep(older_than_s),
        "staging_entries": sweep_directory_entries(extra_staging_dir, older_than_s) if extra_staging_dir else 0,
    }
    if any(counts.values()):
        log.info("storage sweep removed %s", counts)
    return counts
