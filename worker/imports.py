"""Running checkpoint imports: fetch the source, then the same ingest as an upload (hash, validation,
pickle rules, quota, content-addressed storage).

An import lives in the database like a job: a worker claims it (queued -> running, attempts counted),
beats while it fetches, and finishes it; a transient failure (the source answered 5xx, the connection
broke) puts it back in the queue with a delay until REBASIN_JOB_MAX_ATTEMPTS. The workers' sweep queues
again an import whose worker died or whose broker message was lost.
"""

import logging
import threading
from datetime import timedelta
from pathlib import PurePosixPath

from sqlalchemy import or_, select, update

from api.problems import Problem
from api.uploads import KINDS, HashingFileWriter, ReceivedFile, create_resource, staging_workdir, validate_file
from core.config import Settings
from storage.artifacts import open_store, sha256_file
from storage.db import session_scope
from storage.models import CheckpointImport, utcnow
from storage.sources import SourceFailed, SourceRefused, fetch, parse_source
from worker.app import celery_app
from worker.jobs import _holder_alive, problem, this_process

log = logging.getLogger("rebasin.imports")

RETRY_DELAYS_S = (5, 30, 120)
# A queued import whose message was sent this long ago and not taken is sent again (the broker may have lost it;
# a duplicate finds nothing to claim).
RESEND_AFTER_S = 600
SEND_GRACE_S = 5


def enqueue_import(import_id: str, countdown: float = 0) -> None:
    celery_app.send_task("rebasin.run_import", args=[import_id], queue="default", countdown=countdown or None)


def default_name(source: str) -> str:
    return PurePosixPath(source.split("?")[0].rstrip("/")).name[:255] or source[:255]


def _claim(db_url: str, import_id: str, max_attempts: int) -> CheckpointImport | None:
    with session_scope(db_url) as session:
        row = session.get(CheckpointImport, import_id)
        if row is None or row.status != "queued":
            return None
        now = utcnow()
        if row.attempts >= max_attempts:
            values = {"status": "failed", "finished_at": now, "error": problem(
                "worker-lost", "The import stopped its worker too many times", f"The import was started {row.attempts} times.", 500)}
        else:
            values = {"status": "running", "attempts": row.attempts + 1, "claimed_by": this_process(), "heartbeat_at": now,
                      "started_at": row.started_at or now}
        won = session.execute(
            update(CheckpointImport).where(CheckpointImport.id == import_id, CheckpointImport.status == "queued").values(**values)
        ).rowcount
        session.commit()
        row = session.get(CheckpointImport, import_id, populate_existing=True)
        session.expunge(row)
        return row if won and row.status == "running" else None


def _update(db_url: str, row: CheckpointImport, **values) -> bool:
    """Change a running import that this process holds; False if it is no longer ours."""
    with session_scope(db_url) as session:
        changed = session.execute(
            update(CheckpointImport)
            .where(CheckpointImport.id == row.id, CheckpointImport.status == "running", CheckpointImport.claimed_by == row.claimed_by)
            .values(**values)
        ).rowcount
        session.commit()
        return bool(changed)


class _Heartbeat:
    def __init__(self, db_url: str, row: CheckpointImport, interval_s: float):
        self.db_url, self.row, self.interval_s = db_url, row, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                _update(self.db_url, self.row, heartbeat_at=utcnow())
            except Exception as error:
                log.warning("import %s: heartbeat not recorded (%s)", self.row.id, type(error).__name__)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ingest(row: CheckpointImport, settings: Settings) -> str:
    """Fetch the source and store it as a checkpoint; returns the checkpoint's id."""
    source = parse_source(row.source, settings)  # the policy may have changed since submission
    store = open_store(settings.resolved_artifact_uri(), settings.s3_endpoint_url, settings.s3_max_attempts)
    kind, limit = KINDS["checkpoint"], settings.max_upload_bytes
    with staging_workdir(store, settings) as workdir:
        writers: list[HashingFileWriter] = []

        def open_writer():
            if writers:
                writers[-1].discard()  # an earlier attempt's partial bytes
            writers.append(HashingFileWriter(workdir / "import", limit))
            return writers[-1].write

        try:
            downloaded = fetch(source, settings, limit, workdir / "mlflow", open_writer)
        except BaseException:
            if writers:
                writers[-1].discard()
            raise
        if downloaded is None:
            received = writers[-1].close()
        else:
            received = ReceivedFile(downloaded, sha256_file(downloaded), downloaded.stat().st_size)
        info = validate_file(kind, received.path, workdir, settings)
        with session_scope(settings.resolved_database_url()) as session:
            # the stored-bytes quota is checked under the tenant's lock there, as for uploads
            checkpoint = create_resource(session, store, row.tenant, kind, info, received,
                                         row.name or default_name(row.source), settings=settings)
            return checkpoint.id


def run_import(import_id: str, settings: Settings) -> None:
    db_url = settings.resolved_database_url()
    row = _claim(db_url, import_id, settings.job_max_attempts)
    if row is None:
        return
    log.info("import %s: attempt %d of %s", row.id, row.attempts, row.source)
    failure, retry = None, False
    with _Heartbeat(db_url, row, max(0.5, settings.job_heartbeat_timeout_s / 4)):
        try:
            checkpoint_id = ingest(row, settings)
        except SourceRefused as error:
            failure = problem("import-refused", "Import source refused", str(error), 422)
        except SourceFailed as error:
            failure, retry = problem(error.kind, "Import failed", str(error), error.status), error.retry
        except Problem as error:  # validation, quota, size: as an upload would be answered
            failure = error.body()
        except Exception as error:
            log.exception("import %s: crashed", row.id)
            failure, retry = problem("internal", "The import failed unexpectedly", f"{type(error).__name__}: {error}"[:2000], 500), True
    if failure is None:
        if _update(db_url, row, status="succeeded", checkpoint_id=checkpoint_id, finished_at=utcnow(), error=None):
            log.info("import %s: succeeded: checkpoint %s", row.id, checkpoint_id)
        return
    if retry and row.attempts < settings.job_max_attempts:
        delay = RETRY_DELAYS_S[min(row.attempts, len(RETRY_DELAYS_S)) - 1]
        log.warning("import %s: attempt %d failed (%s); trying again in %d s", row.id, row.attempts, failure["detail"], delay)
        if _update(db_url, row, status="queued", claimed_by=None, error=failure, enqueued_at=utcnow()):
            enqueue_import(row.id, countdown=delay)
        return
    if _update(db_url, row, status="failed", error=failure, finished_at=utcnow()):
        log.warning("import %s: failed: %s", row.id, failure["detail"])


def requeue_lost_imports(settings: Settings, release_stale: bool = True) -> list[str]:
    """Queue again imports whose worker died, and send a message for queued imports that have none.
    ``release_stale=False`` spares imports whose heartbeats are merely late (as for jobs)."""
    sent = []
    with session_scope(settings.resolved_database_url()) as session:
        for row in session.scalars(select(CheckpointImport).where(CheckpointImport.status == "running")).all():
            if not _holder_alive(row, settings.job_heartbeat_timeout_s if release_stale else 1e9):
                session.execute(
                    update(CheckpointImport)
                    .where(CheckpointImport.id == row.id, CheckpointImport.status == "running",
                           CheckpointImport.heartbeat_at == row.heartbeat_at)
                    .values(status="queued", claimed_by=None, enqueued_at=None)
                )
        session.commit()
        now = utcnow()
        unsent = select(CheckpointImport.id).where(
            CheckpointImport.status == "queued",
            or_(
                CheckpointImport.enqueued_at.is_(None) & (CheckpointImport.created_at < now - timedelta(seconds=SEND_GRACE_S)),
                CheckpointImport.enqueued_at < now - timedelta(seconds=RESEND_AFTER_S),
            ),
        )
        for import_id in session.scalars(unsent).all():
            enqueue_import(import_id)
            session.execute(update(CheckpointImport).where(CheckpointImport.id == import_id).values(enqueued_at=utcnow()))
            session.commit()
            sent.append(import_id)
    return sent
