from fastapi import APIRouter

import matching

router = APIRouter(prefix="/v1/architectures", tags=["architectures"])


@router.get("", summary="Registered architectures and their options")
def list_architectures():
    return {"items": matching.list_architectures()}
