"""Observability: Prometheus metrics from the live API, and Celery task events as a real Flower sees them."""

import json
import math
import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.observability import Metrics
from kiln import epoch_counts
from kiln.db import utcnow
from kiln.embedded import free_port, wait_until
from kiln.settings import get_settings
from kiln.tables import EpochDurations, EpochMetric, Job, JobStatus
from tests.conftest import ROOT, answers, stop_process
from worker.runner import EpochRecorder, claim
from worker.training import EpochMetrics

SPEC = {"data": {"dataset": "iris"}, "epochs": 3}


def scrape(stack) -> dict[str, list]:
    response = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples, name: str, **labels) -> float:
    return next(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_metrics(stack, client):
    counted = value(scrape(stack)["kiln_epoch_duration_seconds"], "kiln_epoch_duration_seconds_count")
    job = client.post("/v1/jobs", json=SPEC).json()
    stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")
    client.get(f"/v1/jobs/{job['id']}")
    families = scrape(stack)

    assert value(families["kiln_jobs"], "kiln_jobs", status="succeeded") >= 1
    assert {s.labels["status"] for s in families["kiln_jobs"]} == {"queued", "running", "succeeded", "failed",
                                                                   "cancelled"}
    assert value(families["kiln_queue_depth"], "kiln_queue_depth", queue=stack.settings.queue) >= 0
    epochs = families["kiln_epoch_duration_seconds"]
    assert value(epochs, "kiln_epoch_duration_seconds_count") >= counted + SPEC["epochs"], "the worker counts each"
    assert value(epochs, "kiln_epoch_duration_seconds_sum") > 0

    latency = families["kiln_http_request_duration_seconds"]
    routes = {s.labels["route"] for s in latency}
    assert "/v1/jobs/{job_id}" in routes and "/v1/jobs" in routes
    assert not any(job["id"] in route for route in routes), "one series per route, never per id"
    assert value(latency, "kiln_http_request_duration_seconds_count", route="/v1/jobs/{job_id}", method="GET",
                 status="2xx") >= 1


def test_epochs_are_counted_as_written_not_read_back(engine, kiln_database_at, monkeypatch):
    # A scrape reads the counts the workers keep (a row per bucket), never the epochs themselves: with no
    # epoch_metrics row at all, the histogram still holds every epoch counted.
    for seconds in (0.004, 0.02, 0.03, 0.02, 7200.0):
        with Session(engine) as session:
            epoch_counts.count_epoch(session, seconds)
            session.commit()
    with Session(engine) as session:
        assert session.execute(select(EpochDurations.le, EpochDurations.epochs).order_by(EpochDurations.le)).all() \
            == [(0.01, 1), (0.05, 3), (math.inf, 1)]
        assert session.scalar(select(func.count()).select_from(EpochMetric)) == 0
    monkeypatch.setenv("KILN_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # down: no queue depth, no error
    kiln_database_at(engine.url.render_as_string(hide_password=False))

    text = Metrics(get_settings()).render().decode()
    samples = {family.name: family.samples for family in text_string_to_metric_families(text)}
    epochs = samples["kiln_epoch_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in epochs if s.name == "kiln_epoch_duration_seconds_bucket"}
    assert buckets == {"0.01": 1, "0.05": 4, "0.1": 4, "0.5": 4, "1": 4, "5": 4, "10": 4, "30": 4, "60": 4,
                       "300": 4, "900": 4, "3600": 4, "+Inf": 5}
    assert value(epochs, "kiln_epoch_duration_seconds_count") == 5
    assert value(epochs, "kiln_epoch_duration_seconds_sum") == pytest.approx(7200.074)
    assert not samples["kiln_queue_depth"]


def test_an_epoch_committed_twice_is_one_row_counted_once(engine, kiln_database_at):
    # A commit whose acknowledgement was lost is tried again (worker.runner._retrying): the second try finds the
    # epoch written and neither writes nor counts it again.
    kiln_database_at(engine.url.render_as_string(hide_password=False))
    with Session(engine) as session:
        session.add(Job(id="j", owner="default", status=JobStatus.queued, spec=SPEC, queue="kiln",
                        created_at=utcnow(), epochs_completed=0, attempt=0, cancel_requested=False))
        session.commit()
    recorder = EpochRecorder(claim("j", "w@host", get_settings()), None, get_settings(), None)
    epoch = EpochMetrics(epoch=1, train_loss=0.5, val_loss=0.6, val_accuracy=0.7, lr=0.1, duration_s=0.02,
                         samples_per_s=100.0, grad_norm_per_layer={"0.weight": 1.0})
    recorder._commit(epoch)
    recorder._commit(epoch)
    with Session(engine) as session:
        rows = session.scalars(select(EpochMetric)).all()
        assert [(r.epoch, r.grad_norm_per_layer) for r in rows] == [(1, {"0.weight": 1.0})]
        assert json.loads(rows[0].rendered)["train_loss"] == 0.5
        assert session.get(Job, "j").epochs_completed == 1
        assert epoch_counts.histogram(session)[1:] == (1, 0.02)


def test_metrics_hold_no_owner_data(stack, client):
    named = client.post("/v1/jobs", json={**SPEC, "epochs": 1, "name": "secret-project-x"}).json()
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert "secret-project-x" not in text and named["id"] not in text and "default" not in text


@pytest.fixture
def flower(stack, tmp_path):
    pytest.importorskip("flower", reason="Flower is a dev dependency: pip install -e '.[dev]'")
    port = free_port()
    env = {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = tmp_path / "flower.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", stack.settings.broker_url, "flower", "--address=127.0.0.1",
         f"--port={port}", "--persistent=False"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def hears_events() -> bool:
        # Its HTTP server answers before its event receiver listens: wait for a worker's heartbeat event.
        statuses = httpx.get(f"{url}/api/workers", params={"status": "true"}, timeout=5).json()
        return any(statuses.values())

    try:
        wait_until(lambda: answers(f"{url}/healthcheck", process, log), timeout=60, interval=0.2, what="flower")
        wait_until(hears_events, timeout=60, interval=0.5, what="flower to hear the workers' events")
        yield url
    finally:
        stop_process(process)
        if os.environ.get("KILN_SHOW_FLOWER_LOG"):
            print(log.read_text())


def test_flower_sees_kiln_tasks(stack, client, flower):
    job = client.post("/v1/jobs", json=SPEC).json()
    stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")

    def seen():
        tasks = httpx.get(f"{flower}/api/tasks", params={"taskname": "kiln.train"}, timeout=5).json()
        mine = [t for t in tasks.values() if job["id"] in (t.get("args") or "")]
        return mine[0] if mine and mine[0]["state"] == "SUCCESS" else None

    task = wait_until(seen, timeout=60, interval=0.25, what="flower to see the job's task succeed")
    assert task["name"] == "kiln.train" and task["worker"]
    assert task["runtime"] > 0


def test_json_logs_carry_job_ids(make_database, tmp_path):
    from tests.test_faults import FaultStack

    stack = FaultStack(tmp_path, make_database(), log_format="json")
    try:
        stack.start_worker("json")
        job_id = stack.submit(SPEC)
        stack.wait_job(job_id, lambda j: j["status"] == "succeeded")
        records = [json.loads(line) for line in stack.worker_log().splitlines() if line.startswith("{")]
        assert not [line for line in stack.worker_log().splitlines() if line.startswith("[20")], "text log lines"
        mine = [r for r in records if r.get("job_id") == job_id]
        assert any("claimed" in r["message"] for r in mine), records[-10:]
        assert any("finished: succeeded" in r["message"] for r in mine)
        assert {"at", "level", "logger", "message"} <= set(mine[0])
    finally:
        stack.close()
