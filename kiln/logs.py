"""Logging for every kiln process: plain lines by default, one JSON object per line with KILN_LOG_FORMAT=json.

A job's id rides along on every record logged while that job runs (set with `job_context`), so a log
pipeline can select one job's lines from a worker that has run thousands.
"""

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("kiln_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (job_id := getattr(record, "job_id", None)) is not None:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def use_json(logger: logging.Logger | None = None) -> None:
    """Make every handler of logger (default: the root) write JSON lines carrying job ids."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
        handler.addFilter(JobIdFilter())
