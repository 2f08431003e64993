"""Browser sessions, kept on the server: the HttpOnly cookie holds a random token, the database its SHA-256 with
who signed in, so sign-out, a key's revocation or an administrator ends a session at once on every replica.
A session has an idle and an absolute lifetime. The CSRF token is bound to the session token; the same-origin
check for state changes is what browsers ask for."""

import hashlib
import hmac
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from api.identity import Principal
from api.problems import Problem
from core.config import Settings
from storage.models import ApiKey, WebSession, utcnow

SESSION_COOKIE = "rebasin_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_TOKEN_LENGTH = 128
# last_seen_at is written at most this often (not on every request), which is the idle lifetime's precision.
TOUCH_EVERY = timedelta(seconds=60)


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(session: Session, settings: Settings, principal: Principal, key_digest: str | None) -> str:
    """A new session for ``principal``; returns the cookie's token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(WebSession(token_hash=token_hash(token), tenant=principal.tenant, scope=principal.scope,
                           principal=principal.id, key_digest=key_digest, created_at=now, last_seen_at=now,
                           expires_at=now + timedelta(seconds=settings.session_max_s)))
    session.commit()
    return token


def end_session(session: Session, token: str) -> None:
    session.execute(update(WebSession).where(WebSession.token_hash == token_hash(token), WebSession.ended_at.is_(None))
                    .values(ended_at=utcnow()))
    session.commit()


def read_session(session: Session, settings: Settings, env_keys: dict, token: str | None) -> Principal | None:
    """The caller of a live session (not ended, within both lifetimes, its key still valid), else None."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    now = utcnow()
    row = session.execute(
        select(WebSession, ApiKey.revoked_at, ApiKey.expires_at)
        .outerjoin(ApiKey, ApiKey.id == WebSession.principal)
        .where(WebSession.token_hash == token_hash(token))
    ).first()
    if row is None:
        return None
    web, revoked_at, expires_at = row
    if web.ended_at is not None or web.expires_at <= now or now - web.last_seen_at > timedelta(seconds=settings.session_idle_s):
        return None
    if any(t is not None and t <= now for t in (revoked_at, expires_at)):
        return None
    if web.key_digest is not None and web.key_digest not in env_keys:  # REBASIN_API_KEYS changed since sign-in
        return None
    if now - web.last_seen_at > TOUCH_EVERY:
        session.execute(update(WebSession).where(WebSession.token_hash == web.token_hash).values(last_seen_at=now))
        session.commit()
    return Principal(tenant=web.tenant, scope=web.scope, id=web.principal)


def csrf_token(session_token: str) -> str:
    """Bound to the session: a page on another origin can neither read the cookie nor compute this."""
    return _b64(hmac.new(session_token.encode(), b"rebasin-csrf", "sha256").digest())


def check_same_origin(request: Request) -> None:
    """Browsers name the page that sent a request: a state change asked for by another site's page is refused.
    Clients that are not browsers send neither header and are not affected."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    # Host only: behind a TLS-terminating proxy the scheme seen here may be http while the page's is https.
    cross = origin is not None and urlsplit(origin).netloc != request.headers.get("host", "")
    if cross or request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise Problem(403, "Cross-origin request refused", "State-changing requests must come from this server's own pages.", kind="cross-origin")


def check_csrf(request: Request) -> None:
    """A state change authenticated by the session cookie must come from this origin and carry the session's
    CSRF token (a header that a page on another origin can neither read nor forge)."""
    if request.method in SAFE_METHODS:
        return
    check_same_origin(request)
    expected = csrf_token(request.cookies[SESSION_COOKIE])
    if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), expected.encode()):
        raise Problem(403, "CSRF token missing", f"Send the session's CSRF token in the {CSRF_HEADER} header.", kind="csrf")



def delete_old_sessions(sessionmaker) -> int:
    """Sessions that ended or expired a day ago are of no more use (their sign-ins are in the audit log)."""
    cutoff = utcnow() - timedelta(days=1)
    with sessionmaker() as session:
        deleted = session.execute(delete(WebSession).where(or_(WebSession.expires_at < cutoff, WebSession.ended_at < cutoff)))
        session.commit()
        return deleted.rowcount or 0
