"""The web app at ``/``, its cookie sessions, and the API docs served offline (no CDN)."""

from importlib.resources import files
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import web
from api.deps import OPEN_MODE_TENANT, SettingsDep, hash_key
from api.sessions import (
    CSRF_HEADER,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    check_same_origin,
    csrf_token,
    make_session_token,
    session_tenant,
)
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
    open_mode = not request.app.state.tenant_by_key_digest
    return {
        "open_mode": open_mode,
        "signed_in": open_mode or tenant is not None,
        "tenant": OPEN_MODE_TENANT if open_mode else tenant,
        "csrf_token": csrf_token(settings, token) if token and tenant else None,
        "csrf_header": CSRF_HEADER,
        # Files this large go straight to S3 (presigned multipart); smaller ones, or any on a local store, stream.
        "direct_upload_min_bytes": settings.direct_upload_part_bytes if settings.resolved_artifact_uri().startswith("s3://") else None,
    }


@router.get("/v1/session", summary="The browser's session: signed in or not, and its CSRF token")
def get_session(request: Request):
    tenant = session_tenant(request)
    return _session_out(request, request.cookies.get(SESSION_COOKIE) if tenant else None, tenant)


@router.post("/v1/session", responses=problems(401, on_401="Not a valid API key"), summary="Sign in a browser: the API key becomes an HttpOnly, SameSite=Strict session cookie")
def sign_in(request: Request, response: Response, settings: SettingsDep, api_key: Annotated[str, Body(embed=True, max_length=1024)]):
    check_same_origin(request)
    digest = hash_key(api_key.strip())
    tenant = request.app.state.tenant_by_key_digest.get(digest)
    if tenant is None:
        raise Problem(401, "Unauthorized", "This API key is not valid on this server.", errors=[{"field": "api_key", "message": "not a valid API key"}])
    token = make_session_token(settings, digest)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=SESSION_MAX_AGE_S, path="/", httponly=True, samesite="strict",
        secure=behind_tls(request),
    )
    return _session_out(request, token, tenant)


@router.delete("/v1/session", status_code=204, response_class=Response, summary="Sign out a browser")
def sign_out(request: Request):
    check_same_origin(request)
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
