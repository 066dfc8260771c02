"""/v1/jobs: routes only parse, call a service and shape the response."""

import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import FileResponse

from api.deps import OwnerDep, SessionDep
from api.schemas import JobHistory, JobList, JobMetrics, JobOut, Predictions, PredictRequest
from api.services import jobs as service
from api.services import predict as predictions
from kiln.spec import JobSpec
from kiln.tables import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(
    spec: JobSpec,
    session: SessionDep,
    owner: OwnerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> JobOut:
    created = service.create_job(session, owner, spec, idempotency_key)
    if not created.new:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{created.job.id}"
    return JobOut.of(created.job, service.latest_metrics(session, created.job))


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status_: Annotated[list[JobStatus], Query(alias="status")] = [],  # noqa: B006 (FastAPI copies it)
    name: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> JobList:
    rows, next_cursor = service.list_jobs(
        session, owner, statuses=status_, name=name, limit=limit, cursor=cursor
    )
    return JobList(items=[JobOut.of(job, metric) for job, metric in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    job = service.get_job(session, owner, job_id)
    return JobOut.of(job, service.latest_metrics(session, job))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    job = service.cancel_job(session, owner, job_id)
    return JobOut.of(job, service.latest_metrics(session, job))


@router.get("/{job_id}/metrics", response_model=JobMetrics)
def job_metrics(
    job_id: str, session: SessionDep, owner: OwnerDep, since: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0
) -> JobMetrics:
    rows = service.job_metrics(session, owner, job_id, since)
    return JobMetrics(job_id=job_id, epochs=rows)


@router.post("/{job_id}/predict", response_model=Predictions)
def predict(job_id: str, body: PredictRequest, session: SessionDep, owner: OwnerDep) -> Predictions:
    """Predictions for up to 1024 raw input rows from a succeeded job's weights."""
    answer = predictions.predict(session, owner, job_id, body.inputs)
    return Predictions(job_id=job_id, **answer)


@router.get("/{job_id}/history", response_model=JobHistory)
def job_history(job_id: str, session: SessionDep, owner: OwnerDep) -> JobHistory:
    """Every transition of the job: submitted, claimed by which worker, lost, resumed, finished."""
    return JobHistory(job_id=job_id, events=service.job_history(session, owner, job_id))


@router.get(
    "/{job_id}/weights",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}},
)
def job_weights(
    job_id: str, request: Request, session: SessionDep, owner: OwnerDep,
    part: Annotated[Literal["model", "encoder"], Query(description="`encoder`: an autoencoder's encoder")] = "model",
) -> FileResponse:
    job, path, sha256 = service.weights_file(session, request.app.state.store, owner, job_id, part)
    digest_b64 = base64.b64encode(bytes.fromhex(sha256)).decode()
    suffix = "-encoder" if part == "encoder" else ""
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job.name or job.id}{suffix}.safetensors",
        headers={
            "ETag": f'"{sha256}"',
            "Digest": f"sha-256={digest_b64}",
            "Repr-Digest": f"sha-256=:{digest_b64}:",
        },
    )
