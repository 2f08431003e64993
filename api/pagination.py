"""Keyset (cursor) pagination, newest first: stable while rows are being added."""

import base64
import json
from datetime import datetime

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from api.problems import Problem

MAX_PAGE_SIZE = 200


def _encode(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), row_id]).encode()).decode().rstrip("=")


def _decode(token: str) -> tuple[datetime, str]:
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return datetime.fromisoformat(created_at), str(row_id)
    except (ValueError, TypeError):
        raise Problem(400, "Invalid page token", "page_token is not one this server handed out.", kind="page-token") from None


def paginate(session: Session, query: Select, model, page_size: int, page_token: str | None) -> tuple[list, str | None]:
    if page_token:
        created_at, row_id = _decode(page_token)
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < row_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(page_size + 1)))
    if len(rows) > page_size:
        return rows[:page_size], _encode(rows[page_size - 1].created_at, rows[page_size - 1].id)
    return rows, None
