"""Managed API keys over HTTP, for administrators (scope admin): the same operations as `rebasin keys`."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select

from api import identity
from api.deps import AdminDep, SessionDep, SettingsDep
from api.openapi import problems
from api.pagination import MAX_PAGE_SIZE, paginate
from api.problems import not_found
from core.schemas import KeyCreate, KeyCreated, KeyOut, KeyRotate, Page
from storage.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=problems(403))


def _key(session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise not_found("key", key_id)
    return row


@router.post("", status_code=201, response_model=KeyCreated, summary="Create an API key (its secret is shown once)")
def create_key(body: KeyCreate, response: Response, session: SessionDep, settings: SettingsDep, admin: AdminDep, request: Request):
    expires = timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    row, secret = identity.create_key(session, settings, body.tenant, body.scope, body.name, expires)
    request.app.state.keys.forget()
    response.headers["Location"] = f"/v1/keys/{row.id}"
    return identity.key_record(row, secret)


@router.get("", response_model=Page[KeyOut], summary="List API keys, newest first")
def list_keys(
    session: SessionDep,
    admin: AdminDep,
    tenant: Annotated[str | None, Query(max_length=100)] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50,
    page_token: str | None = None,
):
    query = select(ApiKey)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    items, token = paginate(session, query, ApiKey, page_size, page_token)
    return {"items": [identity.key_record(row) for row in items], "next_page_token": token}


@router.get("/{key_id}", response_model=KeyOut, summary="An API key (never its secret)")
def get_key(key_id: str, session: SessionDep, admin: AdminDep):
    return identity.key_record(_key(session, key_id))


@router.delete("/{key_id}", response_model=KeyOut, summary="Revoke an API key: it and its browser sessions stop working at once")
def revoke_key(key_id: str, session: SessionDep, admin: AdminDep, request: Request):
    row = identity.revoke_key(session, _key(session, key_id))
    request.app.state.keys.forget()
    return identity.key_record(row)


@router.post("/{key_id}/rotate", status_code=201, response_model=KeyCreated,
             summary="Rotate an API key: a new secret; the old one keeps working for the overlap")
def rotate_key(key_id: str, body: KeyRotate, response: Response, session: SessionDep, settings: SettingsDep, admin: AdminDep,
               request: Request):
    row, secret = identity.rotate_key(session, settings, _key(session, key_id), timedelta(seconds=body.overlap_s))
    request.app.state.keys.forget()
    response.headers["Location"] = f"/v1/keys/{row.id}"
    return identity.key_record(row, secret)
