"""GET /metrics: Prometheus text format, no key (aggregates only: no ids, owners or names)."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Jobs by status, queue depth, epoch durations and API latency.",
                     "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    return Response(await run_in_threadpool(request.app.state.metrics.render), media_type=CONTENT_TYPE_LATEST)
