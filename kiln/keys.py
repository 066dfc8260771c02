"""Per-owner API keys: created by an operator (`kiln keys create --owner NAME`), shown once, stored as digests.

A key reads `kiln_<id>_<secret>`. The id is public: it finds the row in one indexed lookup and names the key
in listings and revocations. The secret never reaches the database; the row holds the sha256 of the whole key,
compared in constant time. sha256 without a salt is enough here because the secret is 256 random bits, not a
password a person chose: there is no dictionary to precompute.
"""

import hashlib
import hmac
import re
import secrets
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from kiln import reads
from kiln.db import utcnow
from kiln.tables import ApiKey

PREFIX = "kiln"
OWNER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_KEY = re.compile(rf"^{PREFIX}_([0-9a-f]{{12}})_[A-Za-z0-9_-]{{43}}$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_owner(owner: str) -> str:
    if not OWNER_PATTERN.match(owner):
        raise ValueError(
            f"owner {owner!r} is not a valid name: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return owner


def create_key(session: Session, owner: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for owner (who exists from then on); returns the row and the key, which is never stored."""
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, owner=check_owner(owner), name=name, digest=digest(key), created_at=utcnow())
    session.add(row)
    session.commit()
    return row, key


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.owner, ApiKey.created_at)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: str) -> bool:
    """Revokes the key at once (every request looks its row up); False when there is no such live key."""
    done = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    return done.rowcount == 1


# A key's row, found by the id in the key: the columns the API's check needs.
_BY_ID = select(ApiKey.id, ApiKey.owner, ApiKey.digest, ApiKey.revoked_at).where(ApiKey.id == bindparam("id"))


async def find_key(key: str) -> Any | None:
    """The row of this exact key (revoked or not), or None; read on the API's event loop (kiln.reads). A
    malformed key costs no query."""
    match = _KEY.match(key)
    if match is None:
        return None
    found = await reads.rows(_BY_ID, id=match.group(1))
    if not found or not hmac.compare_digest(digest(key), found[0].digest):
        return None
    return found[0]
