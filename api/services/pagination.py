"""Keyset pagination cursors shared by every list endpoint: opaque to clients, (created_at, id) inside."""

import base64
import binascii
import json
from datetime import datetime

from api.errors import InvalidRequest
from kiln.storage import is_id


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        created = datetime.fromisoformat(created_at)
        if created.tzinfo is None:  # not one we issued, and a naive time cannot be compared with the column
            raise ValueError("naive timestamp")
        if not isinstance(row_id, str) or not is_id(row_id):
            raise ValueError("not a kiln id")
        return created, row_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidRequest(
            "The cursor is not one this API issued; pass next_cursor from a previous page unchanged.",
            details=[{"field": "query.cursor", "message": "invalid cursor"}],
        ) from exc
