"""The OpenAPI document, made exact for every route (also those added later) in one pass over it:
every error status an operation can answer, as ``application/problem+json`` with the one ``Problem``
schema; the bearer scheme; ``Location`` headers. Routes add what only they know as ``responses=``
(e.g. ``problems(409)``); operation ids are the endpoint functions' names (``get_job``)."""

from http import HTTPStatus

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from api.deps import get_principal, open_mode_blocking
from api.problems import routes_of
from core.schemas import DOCUMENTED_MODELS

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
BINARY = {"type": "string", "format": "binary"}
# Problems some operations answer besides those found from their shape (see _errors_of).
WHEN = {
    400: "Bad request: a malformed body, page token or Idempotency-Key",
    401: "No valid API key",
    403: "A key or token whose scope does not allow the request, or a browser session's request without its CSRF "
         "token or from another origin",
    404: "Not found (or another tenant's)",
    409: "Conflict with the resource's state",
    410: "Gone",
    413: "Body larger than REBASIN_MAX_UPLOAD_BYTES",
    415: "Not multipart/form-data",
    422: "Invalid request",
    429: "Over the tenant's request rate or a quota (see GET /v1/usage); retry after Retry-After seconds",
    500: "Internal error",
}


def operation_id(route: APIRoute) -> str:
    """The endpoint's name: ``upload_checkpoint``, ``get_job``, ... (unique, checked in ``document``)."""
    return route.name


def problems(*codes: int, **descriptions: str) -> dict:
    """``responses=`` for a route that answers these problems besides the usual ones."""
    return {code: {"description": descriptions.get(f"on_{code}", WHEN.get(code, HTTPStatus(code).phrase))} for code in codes}


def download_responses(what: str) -> dict:
    return {
        200: {"description": what, "content": {"application/octet-stream": {"schema": BINARY}}},
        307: {"description": "Redirect to a presigned URL of the object store (S3)",
              "headers": {"Location": {"schema": {"type": "string"}, "description": "the presigned URL"}}},
    }


def _needs_key(dependant) -> bool:
    return any(d.call is get_principal or _needs_key(d) for d in dependant.dependencies)


def keyed_operations(routes) -> set[tuple[str, str]]:
    """(path, method) of the operations that take an API key: those whose dependencies ask for the tenant."""
    keyed = set()
    for route in routes:
        dependant = getattr(getattr(route, "original_route", route), "dependant", None)
        if dependant is not None and _needs_key(dependant):
            keyed |= {(route.path_format, method.lower()) for method in route.methods}
    return keyed


def operation_method_changes_state(operation: dict) -> bool:
    return operation.get("x-method", "get") not in ("get", "head", "options")


def _errors_of(path: str, operation: dict, keyed: bool, tenant_scoped: bool) -> set[int]:
    params = operation.get("parameters", [])
    body = operation.get("requestBody", {}).get("content", {})
    codes = {500}
    if keyed:
        codes.add(401)
    if tenant_scoped:
        codes.add(429)  # the tenant's request rate, with or without keys
    if params or body:
        codes.add(422)
    if "{" in path:
        codes.add(404)
    if path.startswith("/v1/") and operation_method_changes_state(operation):
        codes.add(403)  # a browser session's request without its CSRF token, or from another origin
    if body:
        codes |= {400, 413}  # a body that does not parse; the size limit applies to every body
    if "multipart/form-data" in body:
        codes |= {400, 415}
    names = {p["name"].lower() for p in params}
    if "page_token" in names:
        codes.add(400)
    if "idempotency-key" in names:
        codes |= {400, 409, 422}
    return codes


def document(schema: dict, keyed: set[tuple[str, str]], tenant_scoped: set[tuple[str, str]] = frozenset()) -> dict:
    """``keyed``: the (path, method) of operations that need an API key (none when the server has no keys);
    ``tenant_scoped``: those that act for a tenant (and count against its request rate), keys or not."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in DOCUMENTED_MODELS:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(generated.pop("$defs", {}))
        schemas[model.__name__] = generated
    for fastapi_default in ("HTTPValidationError", "ValidationError"):
        schemas.pop(fastapi_default, None)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "An API key (managed with `rebasin keys` or /v1/keys, or from REBASIN_API_KEYS), or an OIDC access token "
                                  "when REBASIN_OIDC_ISSUER is set; not needed when the server runs without keys."}
    }
    seen = {}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            op_id = operation.get("operationId")
            if op_id in seen:
                raise RuntimeError(f"operation id {op_id!r} of {method.upper()} {path} is also {seen[op_id]}'s: rename the endpoint")
            seen[op_id] = f"{method.upper()} {path}"
            if (path, method) in keyed:
                operation["security"] = [{"bearer": []}]
            responses = operation.setdefault("responses", {})
            operation["x-method"] = method
            for code in _errors_of(path, operation, (path, method) in keyed, (path, method) in tenant_scoped | keyed):
                responses.setdefault(str(code), {"description": WHEN.get(code, HTTPStatus(code).phrase)})
            for code, response in responses.items():
                if code.isdigit() and int(code) >= 400:
                    content = response.get("content", {})
                    if not content or any(m.get("schema", {}).get("$ref", "").endswith("HTTPValidationError") for m in content.values()):
                        response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}
                    if response.get("description") == "Validation Error":
                        response["description"] = WHEN[422]
                elif code in ("201",) or (code == "202" and method == "post" and operation.get("requestBody")):
                    response.setdefault("headers", {})["Location"] = {"schema": {"type": "string"}, "description": "the new resource's path"}
            operation.pop("x-method")
            if "401" in responses:
                responses["401"].setdefault("headers", {})["WWW-Authenticate"] = {"schema": {"type": "string"}}
            if "429" in responses:
                responses["429"].setdefault("headers", {})["Retry-After"] = {"schema": {"type": "integer"},
                                                                              "description": "seconds to wait"}
    _link_created_resources(schema["paths"])
    return schema


def _link_created_resources(paths: dict) -> None:
    """Links from each POST that creates a resource to the operations on ``{its path}/{id}``, so that
    clients and testers (schemathesis' stateful phase) know where the returned id goes."""
    for path, item in paths.items():
        created = next((r for code, r in item.get("post", {}).get("responses", {}).items() if code in ("201", "202")), None)
        if created is None or item["post"].get("requestBody") is None:
            continue
        for other, other_item in paths.items():
            rest = other[len(path):]
            if not (rest.startswith("/{") and rest.count("{") == 1):
                continue
            parameter = rest[2:rest.index("}")]
            for method, operation in other_item.items():
                created.setdefault("links", {})[f"{operation['operationId']}"] = {
                    "operationId": operation["operationId"], "parameters": {parameter: "$response.body#/id"},
                }


def install_openapi(app: FastAPI) -> None:
    """The document says which operations need a key once the server has any (keys can be added while it runs)."""
    documents = {}

    def openapi() -> dict:
        with_keys = not open_mode_blocking(app)
        if with_keys not in documents:
            generated = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                                    tags=app.openapi_tags)
            tenant_scoped = keyed_operations(routes_of(app))
            documents[with_keys] = document(generated, tenant_scoped if with_keys else set(), tenant_scoped)
        app.openapi_schema = documents[with_keys]
        return app.openapi_schema

    app.openapi = openapi
