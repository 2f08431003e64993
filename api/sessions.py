"""Browser sessions: a signed, HttpOnly cookie in place of the API key, a CSRF token bound to it, and the
same-origin check for state changes that browsers ask for."""

import base64
import hashlib
import hmac
import json
import time
from urllib.parse import urlsplit

from fastapi import Request

from api.problems import Problem
from core.config import Settings

SESSION_COOKIE = "rebasin_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SESSION_MAX_AGE_S = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _session_secret(settings: Settings) -> bytes:
    # Derived from all the keys: replicas agree without configuration, a tenant (who knows one key) cannot
    # forge it, and changing the keys ends every session.
    return hashlib.sha256(b"rebasin-session\0" + settings.api_keys.encode()).digest()


def make_session_token(settings: Settings, key_digest: str) -> str:
    """A signed cookie value naming the key by its digest (the key itself never reaches the browser again)."""
    payload = _b64(json.dumps({"k": key_digest, "e": int(time.time()) + SESSION_MAX_AGE_S}).encode())
    return f"{payload}.{_b64(hmac.new(_session_secret(settings), payload.encode(), 'sha256').digest())}"


def read_session_token(settings: Settings, token: str) -> str | None:
    """The key digest of a valid, unexpired session token, else None."""
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(_session_secret(settings), payload.encode(), "sha256").digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):  # bytes: a cookie may hold any text
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return claims.get("k") if isinstance(claims, dict) and claims.get("e", 0) > time.time() else None


def csrf_token(settings: Settings, session_token: str) -> str:
    """Bound to the session: a page on another origin can neither read it nor compute it."""
    return _b64(hmac.new(_session_secret(settings), b"csrf\0" + session_token.encode(), "sha256").digest())


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


def session_tenant(request: Request) -> str | None:
    """The tenant of the request's session cookie, if it holds a valid session for a current key."""
    token = request.cookies.get(SESSION_COOKIE)
    digest = token and read_session_token(request.app.state.settings, token)
    return request.app.state.tenant_by_key_digest.get(digest) if digest else None


def check_csrf(request: Request) -> None:
    """A state change authenticated by the session cookie must come from this origin and carry the session's
    CSRF token (a header that a page on another origin can neither read nor forge)."""
    if request.method in SAFE_METHODS:
        return
    check_same_origin(request)
    expected = csrf_token(request.app.state.settings, request.cookies[SESSION_COOKIE])
    if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), expected.encode()):
        raise Problem(403, "CSRF token missing", f"Send the session's CSRF token in the {CSRF_HEADER} header.", kind="csrf")
