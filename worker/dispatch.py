"""Which job a worker runs next, and making sure every queued job has a broker message.

A broker message is a wake-up call, not an assignment: the worker that takes one
runs the job the database picks, fairly between tenants (the tenant served least
recently goes first, its oldest job first). So a tenant with a thousand queued jobs
delays another tenant's single job by at most one job per worker, and duplicate or
stale messages are harmless (a worker that finds nothing to claim does nothing).

Because messages are interchangeable, a lost one (Redis restarted empty, a crash
between commit and send) is repaired by counting: whenever the broker holds fewer
messages for a queue than the database has jobs waiting in it, the difference is sent.
"""

import logging
from datetime import timedelta

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from storage.models import Job, utcnow
from worker.app import QUEUE_FOR_DEVICE, celery_app, enqueue_job

log = logging.getLogger("rebasin.worker")

# A job younger than this may have its message still on the way from the API.
SEND_GRACE_S = 5.0


def in_queue(queue: str) -> ColumnElement[bool]:
    """SQL condition: the job's requested device routes it to this broker queue (see worker.app.queue_for)."""
    device = Job.request["device"].as_string()
    kinds = [kind for kind, name in QUEUE_FOR_DEVICE.items() if name == queue]
    conditions = [device.like(f"{kind}%") if kind == "cuda" else device == kind for kind in kinds]
    if queue == "default":
        conditions.append(device.is_(None))
    return or_(*conditions) if conditions else Job.id.is_(None)


def next_job_id(session: Session, queue: str) -> str | None:
    """The queued job to run next in this queue: from the tenant whose last job started longest ago."""
    earlier = aliased(Job)
    waiting = select(Job.tenant).where(Job.status == "queued", in_queue(queue)).distinct().subquery()
    last_start = select(func.max(earlier.started_at)).where(earlier.tenant == waiting.c.tenant).scalar_subquery()
    tenant = session.scalar(select(waiting.c.tenant).order_by(last_start.asc().nulls_first(), waiting.c.tenant).limit(1))
    if tenant is None:
        return None
    return session.scalar(
        select(Job.id).where(Job.tenant == tenant, Job.status == "queued", in_queue(queue)).order_by(Job.created_at, Job.id).limit(1)
    )


def waiting_messages(queue: str) -> int:
    """Messages the broker holds for this queue, not yet taken by a worker."""
    with celery_app.connection_for_write() as connection:
        try:
            return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors:
            return 0  # the queue does not exist (yet, or any more: a broker restarted empty)


def send_missing_messages(session: Session) -> list[str]:
    """Send one message per queued job the broker has no message for; returns the jobs named in them."""
    # A job the API committed a moment ago but has not yet marked as sent: its message is on the way.
    in_flight = (Job.enqueued_at.is_(None)) & (Job.created_at >= utcnow() - timedelta(seconds=SEND_GRACE_S))
    sent = []
    for queue in sorted(set(QUEUE_FOR_DEVICE.values())):
        waiting_jobs = session.execute(
            select(Job.id, Job.request).where(Job.status == "queued", in_queue(queue), ~in_flight).order_by(Job.created_at)
        ).all()
        missing = len(waiting_jobs) - waiting_messages(queue) if waiting_jobs else 0
        resent = [job_id for job_id, _ in waiting_jobs[:max(0, missing)]]
        for job_id, request in waiting_jobs[:len(resent)]:
            enqueue_job(job_id, request.get("device", "auto"))
        if resent:
            session.execute(update(Job).where(Job.id.in_(resent)).values(enqueued_at=utcnow()))
            session.commit()
        sent += resent
    return sent
