"""Registered architectures: built-ins, plugins, and every torchvision and timm classification model
(thousands of names: filtered by family and name, paginated)."""

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

import matching
from api.deps import SessionDep, TenantDep
from api.openapi import problems
from api.problems import Problem, not_found
from matching.architectures import FAMILIES
from storage.models import Checkpoint

router = APIRouter(prefix="/v1/architectures", tags=["architectures"])
MAX_ARCHITECTURE_PAGE = 1000


def _offset(token: str | None) -> int:
    if not token:
        return 0
    try:
        offset = int(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().removeprefix("o:"))
    except ValueError:
        offset = -1
    if offset < 0:
        raise Problem(400, "Invalid page token", "page_token is not one this server handed out.", kind="page-token")
    return offset


@router.get("", summary="Registered architectures and their options")
async def list_architectures(
    family: Annotated[Literal[FAMILIES] | None, Query(description="builtin, plugin, torchvision or timm")] = None,
    q: Annotated[str | None, Query(max_length=200, description="case-insensitive part of the name, e.g. resnet")] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_ARCHITECTURE_PAGE)] = 100,
    page_token: str | None = None,
):
    """Built-ins first, then plugins, torchvision and timm models (``torchvision/<name>``, ``timm/<name>``).
    ``families`` counts the names in each family that match ``q``."""
    offset = _offset(page_token)
    names = await run_in_threadpool(matching.list_architectures, family, q)
    items = names[offset:offset + page_size]
    following = offset + page_size
    return {
        "items": items,
        "next_page_token": base64.urlsafe_b64encode(f"o:{following}".encode()).decode().rstrip("=") if following < len(names) else None,
        "total": len(names),
        "families": {f: sum(1 for a in names if a["family"] == f) for f in FAMILIES if family in (None, f)},
    }


@router.get("/inferred-options", responses=problems(404, on_404="No such checkpoint"), summary="The options that a checkpoint's tensor shapes determine for an architecture")
def inferred_options(name: str, checkpoint: str, session: SessionDep, tenant: TenantDep):
    row = session.get(Checkpoint, checkpoint)
    if row is None or row.tenant != tenant:
        raise not_found("checkpoint", checkpoint)
    try:
        options = matching.infer_options(name, {k: tuple(t["shape"]) for k, t in row.tensors.items()})
    except (matching.MatchingError, KeyError, IndexError) as error:
        raise Problem(422, "Options not inferable", f"{name}: {error}", kind="invalid-input") from None
    return {"name": name, "checkpoint": checkpoint, "options": options}
