"""Idempotency-Key: a retried request gets the first one's response instead of doing the work twice.

Same key, same request: the stored response is replayed. Same key, different
request: 422. Same key while the first is still being handled: 409.
"""

import hashlib
import json
from datetime import timedelta

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.problems import Problem
from storage.models import IdempotencyRecord, utcnow

# A first request that never finished (its process died) stops blocking retries after this long.
IN_FLIGHT_TIMEOUT = timedelta(minutes=10)
MAX_KEY_LENGTH = 255


def fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(jsonable_encoder(payload), sort_keys=True).encode()).hexdigest()


def begin(session: Session, tenant: str, scope: str, key: str, request_sha256: str) -> JSONResponse | None:
    """Claim the key for this request; returns the replayed response if it was already answered."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise Problem(400, "Invalid Idempotency-Key", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.")
    session.add(IdempotencyRecord(tenant=tenant, scope=scope, key=key, request_sha256=request_sha256))
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
    record = session.get(IdempotencyRecord, (tenant, scope, key))
    if record is None:  # the first attempt was abandoned just now
        return begin(session, tenant, scope, key, request_sha256)
    if record.request_sha256 != request_sha256:
        raise Problem(
            422, "Idempotency-Key reused", "This Idempotency-Key was used for a different request; use a new key.",
            kind="idempotency-key-reused",
        )
    if record.status_code is None:
        if utcnow() - record.created_at < IN_FLIGHT_TIMEOUT:
            raise Problem(409, "Request in progress", "A request with this Idempotency-Key is still being processed; retry shortly.",
                          kind="idempotency-in-progress", headers={"Retry-After": "1"})
        record.created_at = utcnow()
        session.commit()
        return None
    headers = {"Idempotent-Replayed": "true"} | ({"Location": record.location} if record.location else {})
    return JSONResponse(record.response, status_code=record.status_code, headers=headers)


def complete(session: Session, tenant: str, scope: str, key: str, status_code: int, response, location: str | None) -> None:
    record = session.get(IdempotencyRecord, (tenant, scope, key))
    record.status_code, record.response, record.location = status_code, jsonable_encoder(response), location
    session.commit()


def abandon(session: Session, tenant: str, scope: str, key: str) -> None:
    """Forget a key whose request failed, so that a retry is handled afresh."""
    session.rollback()
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.tenant == tenant, IdempotencyRecord.scope == scope, IdempotencyRecord.key == key,
            IdempotencyRecord.status_code.is_(None),
        )
    )
    session.commit()
