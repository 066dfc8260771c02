"""The Python SDK: a typed httpx client for the kiln HTTP API (docs/API.md).

    >>> from kiln import Client
    >>> with Client() as kiln:                      # URL and key found as the CLI finds them
    ...     job = kiln.submit({"data": {"dataset": "iris"}, "epochs": 20})
    ...     job = kiln.wait(job["id"], timeout=300)
    ...     kiln.download(job["id"], "iris.safetensors")

Discovery: the URL is `KILN_URL`, else the address `kiln up` recorded in `KILN_DATA_DIR/server.json`, else
http://127.0.0.1:8000; the key is `KILN_API_KEY`, else the key file `kiln up` wrote (`KILN_DATA_DIR/api_key`).

Every failure is a `KilnError` carrying one sentence: the API's own error (`status`, `code`, `message`,
`details`), or `status` 0 when the server could not be reached at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NotRequired, TypedDict

import httpx

from kiln.settings import get_settings
from kiln.spec import JobSpec

__all__ = [
    "Client", "KilnError", "Job", "EpochMetrics", "Dataset", "Predictions", "HistoryEvent",
    "StatusEvent", "EpochEvent", "EndEvent", "Event", "TERMINAL", "job_progress", "job_eta",
]

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8000"
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# --- what the API returns ---------------------------------------------------------------------------


class EpochMetrics(TypedDict):
    """One epoch of a job, as `GET /v1/jobs/{id}/metrics` returns it.

    >>> m = kiln.metrics(job_id)[-1]
    >>> print(m["epoch"], m["train_loss"], m["val_accuracy"])
    """

    epoch: int
    attempt: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    duration_s: float
    samples_per_s: float
    grad_norm: float | None
    grad_norm_per_layer: dict[str, float | None] | None
    train_accuracy: float | None
    val_r2: float | None


class Job(TypedDict):
    """A job, as `GET /v1/jobs/{id}` returns it; `spec` is the normalised JobSpec with every default filled in.

    >>> job = kiln.get(job_id)
    >>> print(job["status"], job["epochs_completed"], "/", job["spec"]["epochs"])
    """

    id: str
    name: str | None
    status: JobStatus
    spec: dict[str, Any]
    created_at: str
    started_at: str | None
    finished_at: str | None
    epochs_completed: int
    checkpoint_epoch: int
    attempt: int
    worker: str | None
    cancel_requested: bool
    latest_metrics: EpochMetrics | None
    error: str | None
    stop_reason: str | None
    lr_search: dict[str, Any] | None
    progress: NotRequired[float]  # 0..1, from servers that send it (see job_progress)
    eta_seconds: NotRequired[float | None]
    waiting_reason: NotRequired[str | None]  # queued: why no live worker can take it


class Dataset(TypedDict):
    """An uploaded dataset; train on it with `{"data": {"dataset": ds["id"]}}`.

    >>> ds = kiln.datasets.upload("houses.csv", target="price")
    >>> print(ds["id"], ds["task"], ds["rows"], ds["features"])
    """

    id: str
    name: str
    task: str
    rows: int
    features: int
    classes: int | None
    labels: list[Any] | None
    created_at: str


class Predictions(TypedDict):
    """What `predict` answers: class indices with per-class probabilities, values in target units, or
    reconstructed rows (an autoencoder).

    >>> kiln.predict(job_id, [[5.1, 3.5, 1.4, 0.2]])["predictions"]
    [0]
    """

    job_id: str
    predictions: list[Any]
    probabilities: list[list[float]] | None


class HistoryEvent(TypedDict):
    """One transition of a job (`queued`, `claimed`, `worker_lost`, `succeeded`, ...).

    >>> [e["kind"] for e in kiln.history(job_id)]
    ['queued', 'claimed', 'succeeded']
    """

    id: int
    at: str
    kind: str
    attempt: int
    worker: str | None
    epoch: int | None
    message: str


# --- streamed events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusEvent:
    """The job changed (queued, running, claimed by another attempt...); `job` is the whole Job.

    >>> for event in kiln.stream(job_id):
    ...     if isinstance(event, StatusEvent):
    ...         print(event.job["status"])
    """

    id: int | None
    job: Job
    type: ClassVar[str] = "status"


@dataclass(frozen=True)
class EpochEvent:
    """An epoch finished; `metrics` is its row.

    >>> for event in kiln.stream(job_id):
    ...     if isinstance(event, EpochEvent):
    ...         print(event.metrics["epoch"], event.metrics["train_loss"])
    """

    id: int | None
    metrics: EpochMetrics
    type: ClassVar[str] = "epoch"


@dataclass(frozen=True)
class EndEvent:
    """The job reached a terminal status; always the last event of a stream.

    >>> *_, end = kiln.stream(job_id)
    >>> end.job["status"]
    'succeeded'
    """

    id: int | None
    job: Job
    type: ClassVar[str] = "end"


Event = StatusEvent | EpochEvent | EndEvent


# --- errors -----------------------------------------------------------------------------------------


class KilnError(Exception):
    """An error answer from the API (its status, code, one-sentence message and details), or no answer at all
    (status 0, code "unreachable").

    >>> try:
    ...     kiln.get("no-such-job")
    ... except KilnError as exc:
    ...     print(exc.status, exc.code, exc.message)
    404 not_found No job with id 'no-such-job'.
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def discover_url() -> str:
    """KILN_URL, else the address `kiln up` recorded under the data dir, else the default.

    >>> discover_url()
    'http://127.0.0.1:8000'
    """
    if url := os.environ.get("KILN_URL"):
        return url
    try:
        return json.loads((get_settings().data_dir / "server.json").read_text())["url"]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return DEFAULT_URL


def job_progress(job: Mapping[str, Any]) -> float:
    """How far a job is, 0..1: the server's `progress` when it sends one, else epochs completed / epochs.

    >>> job_progress({"status": "running", "epochs_completed": 3, "spec": {"epochs": 12}})
    0.25
    """
    if isinstance(job.get("progress"), int | float):
        return float(job["progress"])
    if job.get("status") == "succeeded":
        return 1.0
    epochs = (job.get("spec") or {}).get("epochs") or 0
    return min(1.0, job.get("epochs_completed", 0) / epochs) if epochs else 0.0


def job_eta(job: Mapping[str, Any], durations: Sequence[float] = ()) -> float | None:
    """Seconds left: the server's `eta_seconds` when it sends one, else the mean of the last epochs' durations
    (`durations`, or the latest epoch's) times the epochs left; None when unknown or finished.

    >>> job_eta({"status": "running", "epochs_completed": 8, "spec": {"epochs": 10}}, [1.5, 2.5])
    4.0
    """
    if job.get("status") in TERMINAL:
        return None
    if "eta_seconds" in job:
        return job["eta_seconds"]
    recent = list(durations)[-5:] or [((job.get("latest_metrics") or {}).get("duration_s"))]
    recent = [d for d in recent if isinstance(d, int | float)]
    epochs = (job.get("spec") or {}).get("epochs") or 0
    if not recent or not epochs:
        return None
    return max(0, epochs - job.get("epochs_completed", 0)) * sum(recent) / len(recent)


# --- server-sent events -----------------------------------------------------------------------------


@dataclass
class _Sse:
    id: str | None
    event: str
    data: str


def _parse_sse(lines: Iterable[str]) -> Iterator[_Sse]:
    """The events of a text/event-stream, per the HTML living standard (comments and `retry:` ignored)."""
    event_id: str | None = None
    event, data = "", []
    for line in lines:
        if not line:
            if data:
                yield _Sse(event_id, event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            event_id = value


def _typed(sse: _Sse) -> Event | None:
    try:
        event_id: int | None = int(sse.id) if sse.id is not None else None
    except ValueError:
        event_id = None
    kinds = {"status": StatusEvent, "epoch": EpochEvent, "end": EndEvent}
    if sse.event not in kinds:
        return None  # a kind this client does not know yet: skipped, the stream goes on
    return kinds[sse.event](event_id, json.loads(sse.data))


def _names_job(error: KilnError, job_id: str) -> bool:
    """A 404 about the job itself (not a route this server lacks): its message names the job's id."""
    return error.code == "not_found" and job_id in error.message


class Datasets:
    """Uploaded datasets: `kiln.datasets.upload(...)`, `.list()`, `.get(id)`.

    >>> ds = kiln.datasets.upload("houses.csv", target="price")
    >>> kiln.submit({"data": {"dataset": ds["id"]}, "epochs": 50})
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self, path: str | Path, target: str | None = None, name: str | None = None,
        task: Literal["auto", "classification", "binary", "regression"] = "auto",
    ) -> Dataset:
        """Upload a CSV (with a header row; `target` names the column to learn) or an NPZ (arrays `x`, `y`).
        `name` defaults to the file's stem; `task` "auto" is detected from the targets.

        >>> ds = kiln.datasets.upload("houses.csv", target="price")
        >>> ds["task"], ds["rows"]
        ('regression', 506)
        """
        path = Path(path)
        form = {"name": name or path.stem, "task": task}
        if target is not None:
            form["target"] = target
        with path.open("rb") as f:
            return self._client._request(
                "POST", "/v1/datasets", files={"file": (path.name, f)}, data=form
            ).json()

    def list(self, page_size: int = 50) -> Iterator[Dataset]:
        """Your uploads, newest first, fetched a page at a time.

        >>> [ds["name"] for ds in kiln.datasets.list()]
        ['houses']
        """
        return self._client._pages("/v1/datasets", {}, None, page_size)

    def get(self, dataset_id: str) -> Dataset:
        """One upload.

        >>> kiln.datasets.get(dataset_id)["features"]
        13
        """
        return self._client._request("GET", f"/v1/datasets/{dataset_id}").json()


class Client:
    """A kiln API client; use it as a context manager (or call `close()`).

    >>> from kiln import Client
    >>> with Client("http://127.0.0.1:8000", api_key="kiln_...") as kiln:
    ...     print([job["status"] for job in kiln.list(limit=5)])

    `url` and `api_key` default to what `kiln up` wrote (see the module docstring); `timeout` is per request.
    """

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or discover_url()).rstrip("/")
        self.timeout = timeout
        if api_key is not None:
            key, self._key_source = api_key, "the api_key given to Client"
            self._no_key_hint = "no API key: pass Client(api_key=...) a key"
        else:
            settings = get_settings()
            key = settings.resolved_api_key()
            self._key_source = "KILN_API_KEY" if settings.api_key.get_secret_value() else str(settings.api_key_file)
            self._no_key_hint = (f"no API key found: set KILN_API_KEY, or start `kiln up`, which writes "
                                 f"{settings.api_key_file}")
        self._key_given = bool(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)
        self._events_route = True  # False once the server answered that it has no /events route
        self.datasets = Datasets(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections.

        >>> kiln = Client(); kiln.close()
        """
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # --- plumbing -------------------------------------------------------------------------------------

    def _unreachable(self, exc: Exception) -> KilnError:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return KilnError(0, "unreachable", f"cannot reach the kiln API at {self.url}: {reason} (is `kiln up` running?)")

    def _error(self, response: httpx.Response) -> KilnError:
        try:
            err = response.json()["error"]
            code, message, details = err.get("code") or "http_error", err.get("message") or "", err.get("details")
        except (ValueError, KeyError, TypeError):
            text = " ".join(response.text.split())[:200]
            code, details = "http_error", None
            message = f"HTTP {response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")
        if response.status_code == 401:
            hint = f"the key came from {self._key_source}" if self._key_given else self._no_key_hint
            message = f"{message} ({hint})"
        return KilnError(response.status_code, code, message, details)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _pages(self, path: str, params: dict[str, Any], limit: int | None, page_size: int) -> Iterator[Any]:
        params = {**params, "limit": min(page_size, limit) if limit else page_size}
        count = 0
        while True:
            page = self._request("GET", path, params=params).json()
            for item in page["items"]:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            if not page.get("next_cursor") or (limit is not None and count >= limit):
                return
            params["cursor"] = page["next_cursor"]

    # --- jobs -----------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec | Mapping[str, Any], idempotency_key: str | None = None) -> Job:
        """Submit a job spec (a `kiln.spec.JobSpec`, or the same as a dict); returns the queued Job.
        With `idempotency_key`, a retry returns the first job instead of creating another.

        >>> job = kiln.submit({"data": {"dataset": "iris"}, "epochs": 50})
        >>> from kiln.spec import JobSpec
        >>> job = kiln.submit(JobSpec.model_validate({"data": {"dataset": "digits"}}), idempotency_key="run-42")
        """
        body = spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec) else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def get(self, job_id: str) -> Job:
        """One job.

        >>> kiln.get(job_id)["status"]
        'running'
        """
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(
        self, status: str | Sequence[str] | None = None, name: str | None = None, limit: int | None = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        """Jobs, newest first, fetched a page at a time as you iterate; `limit` caps how many in all.

        >>> for job in kiln.list(status=["running", "queued"]):
        ...     print(job["id"], job["status"])
        >>> newest = next(kiln.list(limit=1))
        """
        params: dict[str, Any] = {}
        if status:
            params["status"] = [status] if isinstance(status, str) else [*status]
        if name:
            params["name"] = name
        return self._pages("/v1/jobs", params, limit, page_size)

    def jobs(self, status: Sequence[str] | None = None, limit: int = 50) -> list[Job]:
        """The newest `limit` jobs as a list (`list()` iterates them instead).

        >>> kiln.jobs(status=["failed"], limit=10)
        """
        return [*self.list(status=status, limit=limit)]

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 0.5) -> Job:
        """Block until the job is succeeded, failed or cancelled, and return it (whatever that status; check it).
        Raises TimeoutError after `timeout` seconds. A brief outage of the API (unreachable, 503) is waited out.

        >>> job = kiln.wait(job_id, timeout=600)
        >>> if job["status"] != "succeeded":
        ...     raise RuntimeError(job["error"])
        """
        deadline = time.monotonic() + timeout
        job: Job | None = None
        down_since: float | None = None
        while True:
            try:
                job = self.get(job_id)
                if job["status"] in TERMINAL:
                    return job
                down_since = None
            except KilnError as exc:
                now = time.monotonic()
                down_since = down_since or now
                # A restart or a database blip is waited out; an API that stays away for a minute is an error.
                if exc.status not in (0, 502, 503, 504) or now > deadline or now - down_since > 60:
                    raise
            if time.monotonic() + poll > deadline:
                state = (f"still {job['status']} (epoch {job['epochs_completed']}/{job['spec']['epochs']})"
                         if job else "not seen")
                raise TimeoutError(f"job {job_id} is {state} after {timeout:g} s; wait longer, or cancel it")
            time.sleep(poll)

    def metrics(self, job_id: str, since: int = 0, max_points: int | None = None) -> list[EpochMetrics]:
        """The job's epochs after epoch `since`; with `max_points`, the server downsamples them to at most that
        many rows (the first and last epochs kept).

        >>> rows = kiln.metrics(job_id)
        >>> new = kiln.metrics(job_id, since=rows[-1]["epoch"])
        >>> curve = kiln.metrics(job_id, max_points=200)
        """
        params: dict[str, Any] = {"since": since}
        if max_points is not None:
            params["max_points"] = max_points
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()["epochs"]

    def stream(self, job_id: str, poll: float = 1.0, reconnect_for: float = 30.0) -> Iterator[Event]:
        """The job's events as they happen, from `GET /v1/jobs/{id}/events`: `StatusEvent`s, one `EpochEvent` per
        epoch in order (those already done first), and an `EndEvent` last, when the job is terminal. A dropped
        connection is resumed where it stopped (`Last-Event-ID`); the API unreachable for `reconnect_for` seconds
        raises KilnError. A server without the events route is polled instead (every `poll` seconds).

        >>> for event in kiln.stream(job_id):
        ...     if isinstance(event, EpochEvent):
        ...         print(event.metrics["epoch"], event.metrics["train_loss"])
        ...     elif isinstance(event, EndEvent):
        ...         print("finished:", event.job["status"])
        """
        if not self._events_route:
            yield from self._poll_events(job_id, poll)
            return
        last_id: str | None = None
        last_epoch = 0
        down_since: float | None = None
        timeout = httpx.Timeout(self.timeout, read=max(60.0, self.timeout))  # a quiet stream reconnects
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
                    if r.status_code >= 400:
                        r.read()
                        error = self._error(r)
                        if r.status_code in (404, 405) and not _names_job(error, job_id):
                            self._events_route = False  # an older server: poll the metrics instead
                            yield from self._poll_events(job_id, poll)
                            return
                        raise error
                    down_since = None
                    for sse in _parse_sse(r.iter_lines()):
                        event = _typed(sse)
                        if sse.id is not None:
                            last_id = sse.id
                        if event is None:
                            continue
                        if isinstance(event, EpochEvent):
                            if event.metrics["epoch"] <= last_epoch:
                                continue  # replayed by a server that ignored Last-Event-ID: seen already
                            last_epoch = event.metrics["epoch"]
                        yield event
                        if isinstance(event, EndEvent):
                            return
            except httpx.TransportError as exc:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since >= reconnect_for:
                    raise self._unreachable(exc) from exc
            time.sleep(min(poll, 1.0))  # the stream ended early: resume it after the last event seen

    def _poll_events(self, job_id: str, poll: float) -> Iterator[Event]:
        """stream()'s events from polling the job and its metrics (for servers without the events route)."""
        seq, seen, last = 0, 0, None
        while True:
            job = self.get(job_id)  # read the job first, so no epoch written before the end is missed
            terminal = job["status"] in TERMINAL
            if not terminal and (job["status"], job["attempt"]) != last:
                last = (job["status"], job["attempt"])
                seq += 1
                yield StatusEvent(seq, job)
            for metrics in self.metrics(job_id, since=seen):
                seen = metrics["epoch"]
                seq += 1
                yield EpochEvent(seq, metrics)
            if terminal:
                yield EndEvent(seq + 1, job)
                return
            time.sleep(poll)

    def follow(self, job_id: str) -> Iterator[EpochMetrics]:
        """Each epoch's metrics as it lands (those already done first), until the job ends.

        >>> for m in kiln.follow(job_id):
        ...     print(m["epoch"], m["train_loss"])
        """
        for event in self.stream(job_id):
            if isinstance(event, EpochEvent):
                yield event.metrics

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one never starts, a running one stops at its next batch. A terminal job is a
        KilnError with status 409.

        >>> kiln.cancel(job_id)["status"]
        'cancelled'
        """
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def history(self, job_id: str) -> list[HistoryEvent]:
        """What happened to the job: queued, claimed by which worker, lost, resumed, finished.

        >>> for e in kiln.history(job_id):
        ...     print(e["at"], e["kind"], e["message"])
        """
        return self._request("GET", f"/v1/jobs/{job_id}/history").json()["events"]

    def logs(self, job_id: str, after_epoch: int = 0) -> str:
        """The job's training log, as text: every transition, and the epochs after `after_epoch` (all by default).

        >>> print(kiln.logs(job_id))
        """
        params = {"after_epoch": after_epoch} if after_epoch else None
        try:
            return self._request("GET", f"/v1/jobs/{job_id}/logs", params=params).text
        except KilnError as exc:
            if exc.status == 404 and not _names_job(exc, job_id):
                raise KilnError(404, "not_supported", f"the kiln API at {self.url} does not serve job logs "
                                "(GET /v1/jobs/{id}/logs); upgrade the server") from exc
            raise

    def download(self, job_id: str, path: str | Path | None = None, part: Literal["encoder"] | None = None) -> Path:
        """Save a succeeded job's weights (safetensors) and return where. `path` may be a file or a directory
        (default: the current one), where the server's file name is used. `part="encoder"` saves an
        autoencoder's encoder alone. The file's sha256 is checked against the server's ETag.

        >>> kiln.download(job_id, "model.safetensors")
        PosixPath('model.safetensors')
        >>> from models.weights import load_weights
        >>> model, meta = load_weights(kiln.download(job_id))
        """
        params = {"part": part} if part else {}
        target = Path(path) if path is not None else Path.cwd()
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/weights", params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                if target.is_dir():
                    match = re.search(r'filename="?([^";]+)"?', response.headers.get("content-disposition", ""))
                    target = target / Path(match.group(1) if match else f"{job_id}.safetensors").name
                digest = hashlib.sha256()
                tmp = target.with_name(target.name + ".part")
                with tmp.open("wb") as f:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        expected = response.headers.get("etag", "").strip('"')
        if expected and re.fullmatch(r"[0-9a-f]{64}", expected) and digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise KilnError(0, "corrupt_download", f"the weights of job {job_id} arrived damaged (sha256 "
                            f"{digest.hexdigest()}, expected {expected}); download them again")
        tmp.replace(target)
        return target

    def predict(self, job_id: str, inputs: Sequence[Sequence[float]] | Sequence[float] | Any) -> Predictions:
        """Predictions from a succeeded job for up to 1024 raw rows (as the dataset's features; kiln applies the
        standardisation). One row may be given flat; numpy arrays are accepted.

        >>> kiln.predict(job_id, [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
        {'job_id': '...', 'predictions': [0, 2], 'probabilities': [[0.98, 0.02, 0.0], [0.0, 0.03, 0.97]]}
        """
        rows = inputs.tolist() if hasattr(inputs, "tolist") else [*inputs]
        if rows and isinstance(rows[0], int | float):
            rows = [rows]
        return self._request("POST", f"/v1/jobs/{job_id}/predict", json={"inputs": rows}).json()

    def plot(self, job_id: str, path: str | Path | None = None, max_points: int | None = 1000) -> Any:
        """Draw the job's learning curves (losses; accuracy or R² beside them when there are any) with matplotlib.
        With `path`, save the image there and return the path; else return the matplotlib Figure.

        >>> kiln.plot(job_id, "curves.png")
        PosixPath('curves.png')
        >>> fig = kiln.plot(job_id)        # in a notebook, the figure shows itself
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("Client.plot needs matplotlib: pip install matplotlib") from exc
        job = self.get(job_id)
        rows = self.metrics(job_id, max_points=max_points)
        epochs = [m["epoch"] for m in rows]
        scores = [(key, label) for key, label in (("val_accuracy", "val accuracy"), ("train_accuracy",
                  "train accuracy"), ("val_r2", "val R²")) if any(m.get(key) is not None for m in rows)]
        fig = Figure(figsize=(10 if scores else 6, 4), layout="constrained")
        axes = fig.subplots(1, 2 if scores else 1, squeeze=False)[0]
        axes[0].plot(epochs, [m["train_loss"] for m in rows], label="train loss")
        if any(m.get("val_loss") is not None for m in rows):
            axes[0].plot(epochs, [m.get("val_loss") for m in rows], label="val loss")
        axes[0].set(xlabel="epoch", ylabel=f"loss ({job['spec'].get('loss') or 'loss'})")
        if rows and min(m["train_loss"] for m in rows) > 0:
            axes[0].set_yscale("log")
        axes[0].legend()
        for key, label in scores:
            axes[1].plot(epochs, [m.get(key) for m in rows], label=label)
        if scores:
            axes[1].set(xlabel="epoch", ylabel="score")
            axes[1].legend()
        fig.suptitle(f"{job['name'] or job_id}: {job['status']}, {len(rows) and epochs[-1]}/{job['spec']['epochs']} "
                     "epochs")
        if path is None:
            return fig
        fig.savefig(path)
        return Path(path)
