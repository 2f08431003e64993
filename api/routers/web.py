"""The web app at ``/``, its cookie sessions, and the API docs served offline (no CDN)."""

from importlib.resources import files
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import web
from api.deps import OPEN_MODE_TENANT, SessionDep, SettingsDep, open_mode_blocking
from api.identity import Principal, env_key_digest
from api.oidc import looks_like_jwt
from api.sessions import CSRF_HEADER, SESSION_COOKIE, check_same_origin, csrf_token, end_session, read_session, start_session
from api.openapi import problems
from api.problems import Problem

router = APIRouter(tags=["session"])
DOCS_ASSETS = "/docs-assets"
# The doc pages run their own inline scripts; everything they load must still come from this server (ReDoc
# would otherwise fetch its logo from a CDN).
DOCS_POLICY = "default-src 'self' 'unsafe-inline' data: blob:; frame-ancestors 'none'"


def content_security_policy(settings) -> str:
    """Only this origin may serve scripts, styles and data; S3 is added for direct uploads (presigned PUTs)."""
    connect = ["'self'"]
    if settings.resolved_artifact_uri().startswith("s3://"):
        endpoint = settings.s3_endpoint_url
        connect.append(f"{urlsplit(endpoint).scheme}://{urlsplit(endpoint).netloc}" if endpoint else "https://*.amazonaws.com")
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {' '.join(connect)}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


def behind_tls(request: Request) -> bool:
    return request.url.scheme == "https" or "https" in request.headers.get("x-forwarded-proto", "")


def _session_out(request: Request, token: str | None, tenant: str | None) -> dict:
    settings = request.app.state.settings
    open_mode = open_mode_blocking(request.app)
    return {
        "open_mode": open_mode,
        "signed_in": open_mode or tenant is not None,
        "tenant": OPEN_MODE_TENANT if open_mode else tenant,
        "csrf_token": csrf_token(token) if token and tenant else None,
        "csrf_header": CSRF_HEADER,
        # Files this large go straight to S3 (presigned multipart); smaller ones, or any on a local store, stream.
        "direct_upload_min_bytes": settings.direct_upload_part_bytes if settings.resolved_artifact_uri().startswith("s3://") else None,
    }


@router.get("/v1/session", summary="The browser's session: signed in or not, and its CSRF token")
def get_session(request: Request, session: SessionDep, settings: SettingsDep):
    token = request.cookies.get(SESSION_COOKIE)
    principal = read_session(session, settings, request.app.state.keys.env_keys, token)
    return _session_out(request, token if principal else None, principal.tenant if principal else None)


@router.post("/v1/session", responses=problems(401, on_401="Not a valid API key"), summary="Sign in a browser: the API key becomes an HttpOnly, SameSite=Strict session cookie")
def sign_in(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
            api_key: Annotated[str, Body(embed=True, max_length=4096)]):
    check_same_origin(request)
    presented = api_key.strip()
    principal = _principal_of(request, presented)
    if principal is None:
        raise Problem(401, "Unauthorized", "This API key is not valid on this server.", errors=[{"field": "api_key", "message": "not a valid API key"}])
    request.state.principal = principal  # for the audit log
    env_digest = env_key_digest(presented)
    token = start_session(session, settings, principal, env_digest if env_digest in request.app.state.keys.env_keys else None)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=settings.session_max_s, path="/", httponly=True, samesite="strict",
        secure=behind_tls(request),
    )
    return _session_out(request, token, principal.tenant)


def _principal_of(request: Request, presented: str) -> Principal | None:
    if not presented:
        return None
    oidc = request.app.state.oidc
    if oidc is not None and looks_like_jwt(presented):
        return oidc.verify(presented)
    return request.app.state.keys.principal(presented)


@router.delete("/v1/session", status_code=204, response_class=Response, summary="Sign out a browser: its session ends on the server")
def sign_out(request: Request, session: SessionDep, settings: SettingsDep):
    check_same_origin(request)
    if token := request.cookies.get(SESSION_COOKIE):
        request.state.principal = read_session(session, settings, request.app.state.keys.env_keys, token)  # for the audit log
        end_session(session, token[:256])
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=behind_tls(request))
    return response


def _with_policy(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    return response


def install_web(app: FastAPI) -> None:
    """The app at /, its assets under /app/, and /docs + /redoc with assets from the fastapi-offline package."""
    app.include_router(router)
    policy = content_security_policy(app.state.settings)
    index = web.STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    def home():
        return FileResponse(index, media_type="text/html", headers={
            "Content-Security-Policy": policy, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    app.mount("/app", StaticFiles(directory=web.STATIC_DIR), name="app")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui():
        return _with_policy(get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} API", swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css", swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        ))

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return _with_policy(get_redoc_html(
            openapi_url=app.openapi_url, title=f"{app.title} API", redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False,
        ))
