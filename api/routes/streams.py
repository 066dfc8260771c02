"""/v1/jobs/{id}/events and /logs: a job as it happens (Server-Sent Events) and as a log (plain text)."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from api.deps import OwnerDep, SessionDep
from api.errors import InvalidRequest
from api.schemas import error_responses
from api.services import jobs as service
from api.services.events import stream_job
from kiln.db import get_sessionmaker

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_STREAM = {
    "description": "Server-Sent Events: `status` (a Job) on connect and at every change, `epoch` (EpochMetrics) "
    "as each epoch lands, and `end` (the final Job) when the job is over. An event's `id` is the number of epochs "
    "sent so far: reconnect with `Last-Event-ID` to resume after them.",
    # OpenAPI 3.1 has a text/event-stream's schema describe each event (3.2 calls it itemSchema); keepalive
    # comments are not events.
    "content": {"text/event-stream": {"schema": {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": ["status", "epoch", "end"]},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "description": "A Job (status, end) or EpochMetrics (epoch), as JSON."},
        },
        "required": ["event", "id", "data"],
    }}},
}


@router.get(
    "/{job_id}/events",
    operation_id="streamJobEvents",
    response_class=StreamingResponse,
    responses={200: _STREAM, **error_responses(404)},
)
def job_events(
    job_id: str, request: Request, owner: OwnerDep,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> StreamingResponse:
    after = _epochs_seen(last_event_id)
    with get_sessionmaker()() as session:  # closed before the stream starts: a stream holds no connection
        service.get_job(session, owner, job_id)
    return StreamingResponse(
        stream_job(request.app.state.watcher, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _epochs_seen(last_event_id: str | None) -> int:
    if last_event_id is None or last_event_id == "":
        return 0
    if not last_event_id.isdigit():
        raise InvalidRequest(
            f"Last-Event-ID must be the id of an event this stream sent (a number of epochs), not {last_event_id!r}.",
            details=[{"field": "header.last-event-id", "message": "a non-negative integer"}],
        )
    return int(last_event_id)


@router.get(
    "/{job_id}/logs",
    operation_id="getJobLogs",
    # Response, not PlainTextResponse: FastAPI documents a route's error answers under its response class's media
    # type, and they are JSON (the 200 is documented as text/plain below, and the handler returns one).
    response_class=Response,
    responses={200: {"description": "Every transition and epoch of the job, one line each, oldest first.",
                     "content": {"text/plain": {"schema": {"type": "string"}}}},
               **error_responses(404)},
)
def job_logs(
    job_id: str, session: SessionDep, owner: OwnerDep,
    after_epoch: Annotated[int, Query(ge=0, le=2**31 - 1, description="Only the epochs after this one (every "
                                      "transition still): how `kiln logs --follow` asks for what is new.")] = 0,
) -> PlainTextResponse:
    return PlainTextResponse(service.job_log(session, owner, job_id, after_epoch))
