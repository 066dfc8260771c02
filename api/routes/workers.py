"""/v1/workers: the worker registry, as any owner may see it (other owners' job ids are left out)."""

from datetime import timedelta

from fastapi import APIRouter

from api.deps import OwnerDep, SessionDep
from api.schemas import WorkerList, WorkerOut, error_responses
from kiln.settings import get_settings
from kiln.workers import list_workers

router = APIRouter(prefix="/v1/workers", tags=["workers"])

# A worker that has not reported for a day is dropped from the list (its row stays, for the record).
FORGET_AFTER = timedelta(days=1)


@router.get("", response_model=WorkerList, operation_id="listWorkers", responses=error_responses())
def workers(session: SessionDep, owner: OwnerDep) -> WorkerList:
    views = list_workers(session, owner, get_settings().lease_s, FORGET_AFTER)
    return WorkerList(items=[WorkerOut(**view.as_dict()) for view in views])
