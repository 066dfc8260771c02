"""The Python SDK: a thin, typed httpx client for the kiln HTTP API.

    >>> from kiln.client import Client
    >>> with Client() as kiln:                      # URL and key found like the CLI finds them
    ...     job = kiln.submit({"data": {"dataset": "digits"}, "epochs": 5})
    ...     job = kiln.wait(job["id"], timeout=300)
    ...     kiln.download(job["id"], "digits.safetensors")
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from kiln.settings import get_settings

TERMINAL = {"succeeded", "failed", "cancelled"}
DEFAULT_URL = "http://127.0.0.1:8000"


class KilnError(Exception):
    """An error answer from the API, or no answer at all (status 0)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def discover_url() -> str:
    """KILN_URL, else the address `kiln up` recorded under the data dir, else the default."""
    if url := os.environ.get("KILN_URL"):
        return url
    try:
        return json.loads((get_settings().data_dir / "server.json").read_text())["url"]
    except (FileNotFoundError, KeyError, ValueError):
        return DEFAULT_URL


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = (url or discover_url()).rstrip("/")
        key = api_key or get_settings().resolved_api_key()
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {}
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            message = f"cannot reach kiln at {self.url} ({exc}); is `kiln up` running?"
            raise KilnError(0, "unreachable", message) from exc
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": response.text[:200] or response.reason_phrase}
            raise KilnError(response.status_code, err.get("code", ""), err.get("message", ""), err.get("details"))
        return response

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a JobSpec; returns the Job. `kiln.submit({"data": {"dataset": "iris"}})`"""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        """One job. `kiln.get(job_id)["status"]`"""
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, status: list[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs first. `kiln.jobs(status=["running"])`"""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._request("GET", "/v1/jobs", params=params).json()["items"]

    def metrics(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Epochs after `since`. `kiln.metrics(job_id, since=10)`"""
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params={"since": since}).json()["epochs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a queued or running job to stop. `kiln.cancel(job_id)`"""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def download(self, job_id: str, path: str | Path) -> Path:
        """Save a succeeded job's safetensors weights. `kiln.download(job_id, "model.safetensors")`"""
        path = Path(path)
        data = self._request("GET", f"/v1/jobs/{job_id}/weights").content
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

    def follow(self, job_id: str, poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
        """Yield each epoch's metrics as it lands, until the job ends. `for m in kiln.follow(job_id): ...`"""
        seen = 0
        while True:
            job = self.get(job_id)  # read status first so no epoch written before the end is missed
            for epoch in self.metrics(job_id, since=seen):
                seen = epoch["epoch"]
                yield epoch
            if job["status"] in TERMINAL:
                return
            time.sleep(poll_s)

    def wait(self, job_id: str, timeout: float = 3600, poll_s: float = 0.5) -> dict[str, Any]:
        """Block until the job ends; returns it. Raises TimeoutError. `kiln.wait(job_id, timeout=60)`"""
        deadline = time.monotonic() + timeout
        while (job := self.get(job_id))["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)
        return job
