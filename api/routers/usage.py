from fastapi import APIRouter, Request

from api import quotas
from api.deps import SessionDep, SettingsDep, TenantDep
from core.schemas import UsageOut

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageOut, summary="The caller's quotas and what it uses of them")
def get_usage(request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep):
    return quotas.usage(session, tenant, settings, request.app.state.rate_limiter)
