"""Live events (Server-Sent Events), logs and downsampled metrics, over real HTTP from a real worker."""

import json
import threading
import uuid

import httpx
import pytest

from tests.test_api import assert_error

SPEC = {"data": {"dataset": "iris"}, "epochs": 12}


def read_events(client: httpx.Client, job_id: str, last_event_id: str | None = None, stop_after: int | None = None):
    """(id, event, data) of each event until the stream ends (or stop_after events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events, fields = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


@pytest.fixture(scope="module")
def finished_stream(stack):
    """A job streamed from its submission to its end, by three clients at once."""
    with stack.client() as client:
        job = client.post("/v1/jobs", json=SPEC).json()
        streams: list[list] = [[] for _ in range(3)]

        def follow(i: int) -> None:
            with stack.client() as own:
                streams[i] = read_events(own, job["id"])

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a stream did not end within 120 s"
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
    return job, streams, metrics


def test_a_stream_carries_every_epoch_in_order_then_ends(finished_stream):
    job, streams, metrics = finished_stream
    for events in streams:
        kinds = [kind for _, kind, _ in events]
        assert kinds[0] == "status" and kinds[-1] == "end", kinds
        epochs = [data for _, kind, data in events if kind == "epoch"]
        assert [e["epoch"] for e in epochs] == list(range(1, SPEC["epochs"] + 1))
        assert epochs == metrics, "the stream carries what /metrics stores"
        assert [i for i, kind, _ in events if kind == "epoch"] == list(range(1, SPEC["epochs"] + 1))
        assert events[-1][2]["status"] == "succeeded" and events[-1][0] == SPEC["epochs"]
        statuses = [data["status"] for _, kind, data in events if kind == "status"]
        # In lifecycle order, never back (a fast job may pass through running between two of the watcher's ticks).
        ranks = [["queued", "running", "succeeded"].index(status) for status in statuses]
        assert ranks == sorted(ranks) and statuses[-1] == "succeeded", statuses


def test_last_event_id_resumes_after_the_epochs_seen(client, finished_stream):
    job, _, metrics = finished_stream
    events = read_events(client, job["id"], last_event_id="7")
    assert [data for _, kind, data in events if kind == "epoch"] == metrics[7:]
    assert events[0][1] == "status" and events[-1][1] == "end"
    assert read_events(client, job["id"], last_event_id=str(SPEC["epochs"]))[-1][1] == "end"


def test_a_dropped_stream_resumes_without_gaps(stack, client):
    job = client.post("/v1/jobs", json={**SPEC, "epochs": 20}).json()
    first = read_events(client, job["id"], stop_after=4)  # hang up early, mid-run
    seen = max(i for i, _, _ in first)
    rest = read_events(client, job["id"], last_event_id=str(seen))
    epochs = [d["epoch"] for _, k, d in first + rest if k == "epoch"]
    assert epochs == list(range(1, 21)), epochs
    assert rest[-1][1] == "end"


def test_events_are_scoped_and_checked(stack, client):
    missing = str(uuid.uuid4())
    assert_error(client.get(f"/v1/jobs/{missing}/events"), 404, "not_found")
    job = client.post("/v1/jobs", json={**SPEC, "epochs": 1}).json()
    err = assert_error(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "x1"}), 422,
                       "validation_error")
    assert "Last-Event-ID" in err["message"]
    with stack.client(api_key=stack.create_key(f"other-{uuid.uuid4().hex[:6]}")) as other:
        assert_error(other.get(f"/v1/jobs/{job['id']}/events"), 404, "not_found")
        assert_error(other.get(f"/v1/jobs/{job['id']}/logs"), 404, "not_found")


def test_logs_tell_the_story(client, finished_stream):
    job, _, _ = finished_stream
    response = client.get(f"/v1/jobs/{job['id']}/logs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert lines[0].split()[1] == "queued" and lines[-1].split()[1] == "succeeded", lines
    assert sum(" epoch 1/12 " in line or line.split()[2:4] == ["epoch", "1/12"] for line in lines) == 1
    assert any("claimed" in line for line in lines)
    # A follower's next read: every transition, and only the epochs after the ones it has.
    tail = client.get(f"/v1/jobs/{job['id']}/logs", params={"after_epoch": 10}).text.splitlines()
    assert [line.split()[3] for line in tail if line.split()[1] == "epoch"] == ["11/12", "12/12"]
    assert [line for line in lines if line.split()[1] != "epoch" or line.split()[3] in ("11/12", "12/12")] == tail
    assert_error(client.get(f"/v1/jobs/{job['id']}/logs", params={"after_epoch": -1}), 422, "validation_error")


def test_progress_and_eta(client, finished_stream):
    job, streams, _ = finished_stream
    running = [d for _, k, d in streams[0] if k == "status" and d["status"] == "running" and d["epochs_completed"]]
    for state in running:
        assert state["progress"] == pytest.approx(state["epochs_completed"] / SPEC["epochs"])
        assert state["eta_seconds"] is not None and state["eta_seconds"] >= 0
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["progress"] == 1.0 and done["eta_seconds"] is None
    queued = client.post("/v1/jobs", json={**SPEC, "epochs": 1}).json()
    assert queued["progress"] == 0.0 and queued["eta_seconds"] is None


def test_max_points_keeps_spikes(stack, client):
    from sqlalchemy import create_engine, text

    job = client.post("/v1/jobs", json={**SPEC, "epochs": 5000}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    stack.wait_for_job(client, job["id"], lambda j: j["status"] == "cancelled")
    # A long, smooth history with one spike in each loss, written as a worker would have.
    rows = [
        {"job_id": job["id"], "epoch": e, "attempt": 1, "train_loss": 100.0 if e == 3333 else 1 / e,
         "val_loss": -1.0 if e == 1234 else 2 / e, "lr": 0.01, "duration_s": 0.1, "samples_per_s": 1000.0}
        for e in range(1, 5001)
    ]
    engine = create_engine(stack.settings.db_url)
    with engine.begin() as conn:
        # The worker may have trained an epoch before the cancel reached it: this history replaces it.
        conn.execute(text("DELETE FROM epoch_metrics WHERE job_id = :id"), {"id": job["id"]})
        conn.execute(text(
            "INSERT INTO epoch_metrics (job_id, epoch, attempt, train_loss, val_loss, lr, duration_s, samples_per_s, "
            "created_at) VALUES (:job_id, :epoch, :attempt, :train_loss, :val_loss, :lr, :duration_s, :samples_per_s, "
            "CURRENT_TIMESTAMP)"), rows)
    engine.dispose()

    full = client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
    assert len(full) == 5000
    points = client.get(f"/v1/jobs/{job['id']}/metrics", params={"max_points": 100}).json()["epochs"]
    epochs = [p["epoch"] for p in points]
    assert len(points) <= 100 and epochs == sorted(epochs)
    assert {1, 1234, 3333, 5000} <= set(epochs), "first, last and both spikes survive"
    assert points == [full[e - 1] for e in epochs], "chosen epochs are returned whole"
    assert_error(client.get(f"/v1/jobs/{job['id']}/metrics", params={"max_points": 1}), 422, "validation_error")


def test_eta_is_the_latest_epoch_times_the_epochs_left():
    # The live check above sees a running state only when the watcher catches one; this one always runs.
    from api.schemas import JobOut
    from kiln.db import utcnow
    from kiln.tables import EpochMetric, Job, JobStatus

    job = Job(id="j", owner="o", name=None, status=JobStatus.running, spec={"epochs": 12}, created_at=utcnow(),
              epochs_completed=3, checkpoint_epoch=3, attempt=1, cancel_requested=False)
    latest = EpochMetric(job_id="j", epoch=3, attempt=1, train_loss=1.0, lr=0.1, duration_s=0.5, samples_per_s=1.0)
    out = JobOut.of(job, latest)
    assert out.progress == 0.25 and out.eta_seconds == 4.5
    job.status = JobStatus.succeeded
    assert JobOut.of(job, latest).progress == 1.0 and JobOut.of(job, latest).eta_seconds is None
