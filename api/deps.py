"""Request dependencies: one database session per request, and the authenticated owner."""

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import Unauthorized
from kiln.db import get_sessionmaker

# The single deployment key (issue: owners and per-owner keys come with the security work).
DEFAULT_OWNER = "default"


def get_session() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API key, as `Authorization: Bearer <key>`.")


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def current_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing API key; send it as `Authorization: Bearer <key>`.")
    # Compare digests in constant time so the key cannot be guessed byte by byte from timings.
    if not hmac.compare_digest(key_digest(credentials.credentials), request.app.state.api_key_digest):
        raise Unauthorized("Unknown API key; check the key `kiln up` printed or KILN_API_KEY.")
    return DEFAULT_OWNER


OwnerDep = Annotated[str, Depends(current_owner)]
