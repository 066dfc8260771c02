"""Liveness and readiness: no key needed."""

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.errors import error_response
from api.schemas import ErrorResponse, Readiness
from kiln.db import get_engine
from kiln.settings import get_settings

router = APIRouter(tags=["operations"])


@router.get("/healthz", operation_id="healthz")
async def healthz() -> dict[str, str]:  # on the event loop: alive means the loop answers, whatever the threads do
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": ErrorResponse,
            "description": "The database or the broker cannot be reached; `details` says which.",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        }
    },
)
def readyz() -> JSONResponse:
    checks = {"database": _check_database(), "broker": _check_broker()}
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        return error_response(
            503, "not_ready", f"Cannot reach the {' and the '.join(failing)}; check that it is running.",
            details=checks, headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "checks": checks})


def _check_database() -> bool:
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _check_broker() -> bool:
    try:
        client = redis.Redis.from_url(get_settings().broker_url, socket_timeout=1, socket_connect_timeout=1)
        with client:
            return bool(client.ping())
    except Exception:
        return False
