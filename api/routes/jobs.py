"""/v1/jobs: routes only parse, call a service and shape the response."""

import base64
import os
from collections.abc import Iterator
from typing import Annotated, BinaryIO, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import BEARER, OwnerDep, SessionDep, owner_of
from api.schemas import (
    JobHistory,
    JobList,
    JobMetrics,
    JobOut,
    Predictions,
    PredictRequest,
    error_responses,
)
from api.services import jobs as service
from api.services import metrics
from api.services import predict as predictions
from kiln.spec import JobSpec
from kiln.tables import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _links(job_id: str, *operations: str) -> dict[str, dict]:
    """OpenAPI links from a response that names a job (its `job_id` taken by the runtime expression) to the
    operations on that job: how a client, or a stateful tester, walks create -> get -> metrics -> cancel."""
    return {
        operation[0].upper() + operation[1:]: {"operationId": operation, "parameters": {"job_id": job_id}}
        for operation in operations
    }


# Shown at /docs, and used by API testers as known-good bodies; each one validates (tests/test_schemathesis.py).
SPEC_EXAMPLES = {
    "digits-mlp": {
        "summary": "An MLP on the digits images",
        "value": {
            "name": "digits-mlp",
            "model": {"type": "mlp", "hidden": [128, 64], "activation": "relu", "dropout": 0.1},
            "data": {"dataset": "digits", "val_fraction": 0.2},
            "loss": "cross_entropy",
            "optimizer": {"type": "adam", "lr": 0.002},
            "epochs": 30,
            "batch_size": 64,
            "seed": 0,
        },
    },
    "minimal": {
        "summary": "Every default: the task's natural loss, an MLP, Adam",
        "value": {"data": {"dataset": "iris"}},
    },
    "sine-gru": {
        "summary": "A GRU classifying noisy sine windows by frequency, with early stopping",
        "value": {
            "model": {"type": "rnn", "cell": "gru", "hidden_size": 32},
            "data": {"dataset": "sine", "samples": 2000},
            "epochs": 15,
            "early_stopping": {"patience": 3},
        },
    },
}

_ON_A_JOB = ("getJob", "getJobMetrics", "getJobHistory", "getJobLogs", "getJobWeights", "predict", "cancelJob")
_LOCATION = {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    operation_id="createJob",
    responses={
        201: {"description": "The job, queued.", "headers": _LOCATION,
              "links": _links("$response.body#/id", *_ON_A_JOB)},
        200: {"model": JobOut, "description": "The job an earlier request with this Idempotency-Key created.",
              "headers": _LOCATION, "links": _links("$response.body#/id", *_ON_A_JOB)},
        **error_responses(400, 413, 429),
    },
)
def create_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    session: SessionDep,
    owner: OwnerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> JobOut:
    created = service.create_job(session, owner, spec, idempotency_key)
    if not created.new:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{created.job.id}"
    return service.job_out(session, created.job)


@router.get("", response_model=JobList, operation_id="listJobs", responses=error_responses())
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status_: Annotated[list[JobStatus], Query(alias="status")] = [],  # noqa: B006 (FastAPI copies it)
    # A job's name matches JobSpec.name's pattern, so a filter outside it could match nothing (and a NUL in it
    # would reach the database, which PostgreSQL refuses): a 422 that says what a name may hold.
    name: Annotated[str | None, Query(min_length=1, max_length=200, pattern=r"^[\w.\- ]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    rows, next_cursor = service.list_jobs(
        session, owner, statuses=status_, name=name, limit=limit, cursor=cursor
    )
    waiting = service.waiting(session, [job for job, _ in rows])
    return JobList(items=[JobOut.of(job, metric, waiting.get(job.id)) for job, metric in rows],
                   next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    operation_id="getJob",
    responses={200: {"links": _links("$response.body#/id", *_ON_A_JOB[1:])}, **error_responses(404)},
    openapi_extra=BEARER,
)
async def get_job(job_id: str, request: Request) -> Response:
    # The route clients poll: async, no dependency for FastAPI to solve (the owner is read from the request, as
    # the Authenticate middleware left it), the read on the event loop, the body serialised once.
    return Response(await service.job_json(owner_of(request), job_id), media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    operation_id="cancelJob",
    responses={
        202: {"description": "Cancelled (it was queued), or asked to stop at the next batch (it was running).",
              "links": _links("$response.body#/id", "getJob", "getJobMetrics", "getJobHistory")},
        **error_responses(404, 409),
    },
)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    return service.job_out(session, service.cancel_job(session, owner, job_id))


@router.get(
    "/{job_id}/metrics",
    response_model=JobMetrics,
    operation_id="getJobMetrics",
    responses={200: {"links": _links("$response.body#/job_id", "getJob", "cancelJob")}, **error_responses(404)},
)
async def job_metrics(
    job_id: str, owner: OwnerDep, since: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    max_points: Annotated[int | None, Query(
        ge=10, le=100_000, description="At most this many epochs, chosen server-side to keep each stretch's "
        "lowest and highest train and validation loss (spikes survive), with the first and the last."
    )] = None,
) -> Response:
    body = await run_in_threadpool(metrics.job_metrics_json, owner, job_id, since, max_points)
    return Response(body, media_type="application/json")


@router.post("/{job_id}/predict", response_model=Predictions, operation_id="predict",
             responses=error_responses(400, 404, 409, 413))
def predict(job_id: str, body: PredictRequest, session: SessionDep, owner: OwnerDep) -> Predictions:
    """Predictions for up to 1024 raw input rows from a succeeded job's weights."""
    answer = predictions.predict(session, owner, job_id, body.inputs)
    return Predictions(job_id=job_id, **answer)


@router.get(
    "/{job_id}/history",
    response_model=JobHistory,
    operation_id="getJobHistory",
    responses={200: {"links": _links("$response.body#/job_id", "getJob")}, **error_responses(404)},
)
def job_history(job_id: str, session: SessionDep, owner: OwnerDep) -> JobHistory:
    """Every transition of the job: submitted, claimed by which worker, lost, resumed, finished."""
    return JobHistory(job_id=job_id, events=service.job_history(session, owner, job_id))


@router.get(
    "/{job_id}/weights",
    response_class=StreamingResponse,
    operation_id="getJobWeights",
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The safetensors file.",
            "headers": {
                "ETag": {"description": "The file's sha256, quoted.", "schema": {"type": "string"}},
                "Digest": {"description": "`sha-256=<base64>`", "schema": {"type": "string"}},
                "Content-Disposition": {"description": "The file name.", "schema": {"type": "string"}},
            },
        },
        **error_responses(404, 409),
    },
)
def job_weights(
    job_id: str, request: Request, session: SessionDep, owner: OwnerDep,
    part: Annotated[Literal["model", "encoder"], Query(description="`encoder`: an autoencoder's encoder")] = "model",
) -> StreamingResponse:
    job, file, sha256 = service.weights_file(session, request.app.state.store, owner, job_id, part)
    digest_b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    filename = f"{job.name or job.id}{'-encoder' if part == 'encoder' else ''}.safetensors"
    quoted = quote(filename)  # RFC 6266: a plain filename when it is plain ASCII, else the UTF-8 form
    # Streamed from the file the store opened (not reopened by path): what it checked is what is sent.
    return StreamingResponse(
        _chunks(file),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(os.fstat(file.fileno()).st_size),
            "Content-Disposition": f'attachment; filename="{filename}"' if quoted == filename
            else f"attachment; filename*=utf-8''{quoted}",
            "ETag": f'"{sha256}"',
            "Digest": f"sha-256={digest_b64}",
            "Repr-Digest": f"sha-256=:{digest_b64}:",
        },
    )


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(1 << 20):
            yield chunk
