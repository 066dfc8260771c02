"""Request dependencies: one database session per request, and the authenticated owner.

The key is checked by the Authenticate middleware, before anything reads the request's body: a request without
a valid key costs no parsing, no upload spooled to disk and no validation. Routes take the owner it found.
"""

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from api.errors import Unauthorized, database_unavailable, error_response
from kiln.db import get_sessionmaker
from kiln.keys import digest, find_key

# The owner of the deployment's own key (KILN_API_KEY, or the key file `kiln up` writes).
DEFAULT_OWNER = "default"


def get_session() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# Declares the scheme in the OpenAPI document; the Authenticate middleware has done the checking.
_bearer = HTTPBearer(auto_error=False, description="An API key, as `Authorization: Bearer <key>`.")


async def current_owner(  # async: no trip to the thread pool for what the middleware already decided
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    return owner_of(request)


OwnerDep = Annotated[str, Depends(current_owner)]

# For a route that takes the owner with owner_of(request) instead of OwnerDep, so that FastAPI has no dependency
# to solve per request (GET /v1/jobs/{id}, which clients poll): declares in the OpenAPI document what OwnerDep
# would have declared, `openapi_extra=BEARER`.
BEARER = {"security": [{_bearer.scheme_name: []}]}


def owner_of(request: Request) -> str:
    """The owner the Authenticate middleware found for this request's key."""
    owner = request.scope.get("state", {}).get("owner")
    if owner is None:  # a route outside /v1 asked for an owner: a wiring mistake, refused all the same
        raise Unauthorized("Missing API key; send it as `Authorization: Bearer <key>`.")
    return owner


class Authenticate:
    """Pure ASGI middleware: every /v1 request needs a valid key, checked from the headers alone."""

    def __init__(self, app, deployment_key: str) -> None:
        self.app = app
        self.deployment_digest = digest(deployment_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        try:
            owner = await self.owner_of(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
        except Unauthorized as err:
            await error_response(err.status, err.code, err.message, headers=err.headers)(scope, receive, send)
            return
        except (OperationalError, InterfaceError) as exc:  # outside the app's handlers: answer as they would
            await database_unavailable(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)

    async def owner_of(self, authorization: str) -> str:
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("Missing API key; send it as `Authorization: Bearer <key>`.")
        # Digests compared in constant time, so a key cannot be guessed byte by byte from timings.
        if hmac.compare_digest(digest(key), self.deployment_digest):
            return DEFAULT_OWNER
        row = await find_key(key)
        if row is None:
            raise Unauthorized(
                "Unknown API key; use the key `kiln up` printed, KILN_API_KEY, or one from `kiln keys create`."
            )
        if row.revoked_at is not None:
            raise Unauthorized(f"API key {row.id} was revoked; ask your operator for a new one (`kiln keys create`).")
        return row.owner

