"""/v1/datasets: routes only parse, call a service and shape the response."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status

from api.deps import OwnerDep, SessionDep
from api.schemas import DatasetList, DatasetOut, error_responses
from api.services import datasets as service
from api.services.datasets import RequestedTask

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    operation_id="uploadDataset",
    responses={
        201: {
            "description": "The dataset, stored.",
            "headers": {"Location": {"description": "The dataset's URL.", "schema": {"type": "string"}}},
            "links": {"GetDataset": {"operationId": "getDataset", "parameters": {"dataset_id": "$response.body#/id"}}},
        },
        **error_responses(400, 413),
    },
)
def upload_dataset(
    request: Request,
    session: SessionDep,
    owner: OwnerDep,
    response: Response,
    file: Annotated[UploadFile, File(description="A CSV file with a header row, or an NPZ archive with arrays x "
                                                 "(rows, features) and y (rows,).")],
    name: Annotated[str, Form(min_length=1, max_length=200, pattern=r"^[\w.\- ]+$")],
    task: Annotated[RequestedTask, Form(description="auto: integer targets with 2 distinct values are binary, "
                                                    "with 3 to 50 classification, anything else regression.")] = "auto",
    target: Annotated[str | None, Form(min_length=1, max_length=200,
                                       description="The CSV column to learn (CSV only).")] = None,
) -> DatasetOut:
    """Upload a dataset (at most KILN_MAX_UPLOAD_BYTES); train on it with its id as data.dataset."""
    dataset = service.create_dataset(
        session, request.app.state.store, owner, name=name, task=task, target=target, file=file.file
    )
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetOut.model_validate(dataset)


@router.get("", response_model=DatasetList, operation_id="listDatasets", responses=error_responses())
def list_datasets(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> DatasetList:
    rows, next_cursor = service.list_datasets(session, owner, limit=limit, cursor=cursor)
    return DatasetList(items=[DatasetOut.model_validate(d) for d in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, operation_id="getDataset", responses=error_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, owner, dataset_id))
