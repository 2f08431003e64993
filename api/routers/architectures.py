from fastapi import APIRouter

import matching
from api.deps import SessionDep, TenantDep
from api.problems import Problem, not_found
from storage.models import Checkpoint

router = APIRouter(prefix="/v1/architectures", tags=["architectures"])


@router.get("", summary="Registered architectures and their options")
def list_architectures():
    return {"items": matching.list_architectures()}


@router.get("/inferred-options", summary="The options that a checkpoint's tensor shapes determine for an architecture")
def inferred_options(name: str, checkpoint: str, session: SessionDep, tenant: TenantDep):
    row = session.get(Checkpoint, checkpoint)
    if row is None or row.tenant != tenant:
        raise not_found("checkpoint", checkpoint)
    try:
        options = matching.infer_options(name, {k: tuple(t["shape"]) for k, t in row.tensors.items()})
    except (matching.MatchingError, KeyError, IndexError) as error:
        raise Problem(422, "Options not inferable", f"{name}: {error}", kind="invalid-input") from None
    return {"name": name, "checkpoint": checkpoint, "options": options}
