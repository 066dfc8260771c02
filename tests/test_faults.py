"""Fault injection with real processes: no job lost, none run twice at once, resume from checkpoints.

Each scenario gets its own database, its own restartable broker, an API server and killable worker
processes, and ends with a line:

    FAULT <scenario>: submitted=N succeeded=N failed=N lost=0 concurrent_duplicates=0 epochs_redone=N

(`pytest -m faults -s` shows them; RELIABILITY.md keeps the latest). Both last figures come from the
workers' own logs, not from the database under test: "concurrent duplicates" counts pairs of attempts
of one job whose lifetimes overlapped; "epochs redone" counts epochs an attempt started again after an
earlier attempt had started them (a partly trained epoch lost with a worker counts as one).
"""

import os
import re
import signal
import sqlite3
import subprocess
import threading
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
import redis
import torch
from safetensors.torch import load_file
from sqlalchemy import make_url

from kiln.client import TERMINAL
from kiln.dispatch import TRAIN_TASK, make_celery
from kiln.embedded import EmbeddedRedis, free_port, wait_until
from kiln.launch import worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings
from tests.conftest import answers, api_command, start_process, stop_process, wait_for_job
from tests.netproxy import CuttableProxy

pytestmark = pytest.mark.faults

# About half a second an epoch on this machine: long enough to kill mid-epoch, short enough to run.
SLOW = {
    "data": {"dataset": "regression", "samples": 12000},
    "model": {"type": "mlp", "hidden": [64, 64], "dropout": 0.1},
    "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9},
    "epochs": 8, "batch_size": 32, "seed": 3,
}
QUICK = {"data": {"dataset": "digits"}, "epochs": 12, "batch_size": 32}
LOG_LINE = re.compile(r"^\[(?P<at>[\d\- :,]+): \w+/[^\]]+\] job (?P<job>[0-9a-f-]{36})(?::? )(?P<rest>.*)$")


class FaultStack:
    """kiln on its own database and broker, with workers a test can kill, stop and start."""

    def __init__(self, tmp: Path, database_url: str, *, persist_broker: bool = True, **settings: str) -> None:
        self.tmp = tmp
        self.proxy = None
        if database_url.startswith("postgresql"):
            # Workers and API reach PostgreSQL through a proxy the test can cut.
            url = make_url(database_url)
            self.proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
            database_url = url.set(host="127.0.0.1", port=self.proxy.port).render_as_string(hide_password=False)
        self.database_url = database_url
        upgrade(database_url)
        self.broker = EmbeddedRedis(tmp / "redis", persist=persist_broker).start()
        self.queue = f"faults-{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ,
            "KILN_DATA_DIR": str(tmp / "data"), "KILN_DATABASE_URL": database_url,
            "KILN_BROKER_URL": self.broker.url, "KILN_API_KEY": "faults", "KILN_QUEUE": self.queue,
            "KILN_LEASE_S": "3", "KILN_HEARTBEAT_S": "0.3", "KILN_RECONCILE_INTERVAL_S": "0.5",
            "KILN_OUTBOX_GRACE_S": "1", "KILN_LOST_MESSAGE_GRACE_S": "2",
            **{f"KILN_{k.upper()}": v for k, v in settings.items()},
        }
        self.settings = Settings(broker_url=self.broker.url, queue=self.queue, data_dir=tmp / "data")
        self.workers: dict[str, subprocess.Popen] = {}
        port = free_port()
        self.api = start_process(api_command(port), self.env, tmp / "api.log")
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer faults"},
                                 timeout=30)
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz", self.api, tmp / "api.log"), 60, 0.1, "the API")

    def start_worker(self, name: str, concurrency: int = 1) -> None:
        hostname = f"{name}@faults"
        self.workers[name] = start_process(worker_command(concurrency, self.queue, hostname), self.env,
                                           self.tmp / f"worker-{name}.log")
        celery = make_celery(self.settings)

        def answers() -> bool:
            try:
                return bool(celery.control.ping([hostname], timeout=0.5))
            except redis.ConnectionError:  # seen once in CI: the broker closed this client's connection
                celery.pool.force_close_all()  # ask again on a new one, within the same deadline
                return False

        try:
            wait_until(answers, 60, what=f"worker {name}")
        finally:
            celery.close()

    def kill_worker(self, name: str) -> None:
        """kill -9 the whole worker, as a host that vanished: main process and pool processes."""
        main = psutil.Process(self.workers[name].pid)
        for process in [*main.children(recursive=True), main]:
            process.kill()
        self.workers.pop(name).wait()

    def submit(self, spec: dict, **headers: str) -> str:
        response = self.http.post("/v1/jobs", json=spec, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait_job(self, job_id: str, predicate, timeout: float = 120) -> dict:
        return wait_for_job(self.http, job_id, predicate, timeout)

    def wait_all(self, ids: list[str], timeout: float = 180) -> list[dict]:
        return [self.wait_job(i, lambda j: j["status"] in TERMINAL, timeout) for i in ids]

    def events(self, job_id: str) -> list[dict]:
        return self.http.get(f"/v1/jobs/{job_id}/history").json()["events"]

    def worker_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("worker-*.log")))

    def summary(self, scenario: str, ids: list[str]) -> dict[str, int]:
        """Tally the scenario from the database and the workers' own logs, print it, return it."""
        jobs = [self.job(i) for i in ids]
        spans: dict[tuple[str, int], list[datetime]] = {}  # each attempt's log times
        resumed_after: dict[tuple[str, int], int] = {}
        last_epoch: dict[tuple[str, int], int] = {}
        finished: set[tuple[str, int]] = set()
        for line in self.worker_log().splitlines():
            if not (m := LOG_LINE.match(line)) or m["job"] not in ids:
                continue
            if not (attempt := re.search(r"attempt (\d+)", m["rest"])):
                continue
            key = (m["job"], int(attempt[1]))
            spans.setdefault(key, []).append(datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f"))
            if resume := re.search(r"resuming after epoch (\d+)", m["rest"]):
                resumed_after[key] = int(resume[1])
            elif epoch := re.match(r"attempt \d+ epoch (\d+) ", m["rest"]):
                last_epoch[key] = int(epoch[1])
            elif "finished: succeeded" in m["rest"]:  # handed back, lost or cancelled: stopped mid-epoch
                finished.add(key)
        overlaps = redone = 0
        for (job, attempt), times in spans.items():
            earlier = [k for k in spans if k[0] == job and k[1] < attempt]
            overlaps += sum(min(times) < max(spans[k]) for k in earlier)
            # An attempt that did not finish had started the epoch after its last recorded one.
            started = max((last_epoch.get(k, resumed_after.get(k, 0)) + (k not in finished) for k in earlier),
                          default=0)
            redone += max(0, started - resumed_after.get((job, attempt), 0))
        figures = {
            "submitted": len(jobs),
            "succeeded": sum(j["status"] == "succeeded" for j in jobs),
            "failed": sum(j["status"] == "failed" for j in jobs),
            "lost": sum(j["status"] not in TERMINAL for j in jobs),
            "concurrent_duplicates": overlaps,
            "epochs_redone": redone,
        }
        line = f"FAULT {scenario}: " + " ".join(f"{k}={v}" for k, v in figures.items())
        print("\n" + line)
        if report := os.environ.get("KILN_FAULT_REPORT"):
            with open(report, "a") as f:
                f.write(line + "\n")
        assert figures["lost"] == 0 and figures["concurrent_duplicates"] == 0, line
        return figures

    def close(self) -> None:
        self.http.close()
        for process in [*self.workers.values(), self.api]:
            stop_process(process)
        self.broker.stop()
        if self.proxy:
            self.proxy.close()


@pytest.fixture
def faults(request, tmp_path, make_database):
    stacks: list[FaultStack] = []

    def make(**settings) -> FaultStack:
        stacks.append(FaultStack(tmp_path, make_database(), **settings))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.close()
        if (report := getattr(request.node, "rep_call", None)) and report.failed:
            print(stack.worker_log()[-6000:], (stack.tmp / "api.log").read_text()[-3000:])


def weights(stack: FaultStack, job_id: str) -> dict[str, torch.Tensor]:
    path = stack.tmp / f"{job_id}.safetensors"
    path.write_bytes(stack.http.get(f"/v1/jobs/{job_id}/weights").content)
    return load_file(path)


def losses(stack: FaultStack, job_id: str) -> list[float]:
    epochs = stack.http.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]
    return [m["train_loss"] for m in epochs]


def test_kill9_mid_epoch_resumes_bit_identical(faults):
    stack = faults()
    stack.start_worker("a")
    killed = stack.submit({**SLOW, "name": "killed"})
    stack.wait_job(killed, lambda j: j["epochs_completed"] >= 3)
    stack.kill_worker("a")  # mid-epoch 4 (or 5): the host is gone, the message unacknowledged
    stack.start_worker("b")
    job = stack.wait_all([killed])[0]
    assert job["status"] == "succeeded" and job["attempt"] == 2, job

    reference = stack.submit({**SLOW, "name": "uninterrupted"})
    assert stack.wait_all([reference])[0]["attempt"] == 1

    epochs = stack.http.get(f"/v1/jobs/{killed}/metrics").json()["epochs"]
    assert [m["epoch"] for m in epochs] == list(range(1, 9)), "each epoch exactly once"
    assert {m["attempt"] for m in epochs} == {1, 2}
    assert losses(stack, killed) == losses(stack, reference), "bit-identical loss curve"
    a, b = weights(stack, killed), weights(stack, reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical weights"

    kinds = [e["kind"] for e in stack.events(killed)]
    assert kinds == ["queued", "claimed", "worker_lost", "claimed", "succeeded"], kinds
    resumed = stack.events(killed)[3]
    assert resumed["worker"] == "b@faults" and "resuming from the epoch-" in resumed["message"]
    figures = stack.summary("kill -9 worker mid-epoch", [killed, reference])
    assert 0 < figures["epochs_redone"] <= 1


def test_gives_up_after_max_attempts(faults):
    stack = faults(max_attempts="2")
    stack.start_worker("a")
    job_id = stack.submit({**SLOW, "epochs": 200})
    stack.wait_job(job_id, lambda j: j["epochs_completed"] >= 1)
    stack.kill_worker("a")
    stack.start_worker("b")
    stack.wait_job(job_id, lambda j: j["attempt"] == 2 and j["status"] == "running")
    stack.kill_worker("b")
    job = stack.wait_all([job_id], timeout=60)[0]
    assert job["status"] == "failed" and job["error"] == "worker lost 2 times; giving up"
    stack.summary("worker lost on every attempt", [job_id])


@pytest.mark.parametrize("how", ["restart", "flushall"])
def test_broker_loses_queued_and_running_messages(faults, how):
    stack = faults(persist_broker=False)
    stack.start_worker("a")
    ids = [stack.submit(QUICK) for _ in range(4)]
    stack.wait_job(ids[0], lambda j: j["status"] == "running")
    if how == "restart":
        stack.broker.stop()
        stack.broker.start()  # same port, nothing kept: every queued message is gone
    else:
        with redis.Redis.from_url(stack.broker.url) as r:
            r.flushall()
    jobs = stack.wait_all(ids)
    assert all(j["status"] == "succeeded" for j in jobs), [j["error"] for j in jobs]
    assert any(e["kind"] == "message_lost" for i in ids[1:] for e in stack.events(i))
    stack.summary(f"broker {how} with jobs queued and running", ids)


def test_database_outage_during_training(faults):
    stack = faults(lease_s="10")
    stack.start_worker("a")
    job_id = stack.submit({**SLOW, "epochs": 6})
    stack.wait_job(job_id, lambda j: j["epochs_completed"] >= 2)
    outage = 4.0  # shorter than the lease: the attempt must ride it out
    if stack.proxy:
        stack.proxy.cut()
        threading.Timer(outage, stack.proxy.restore).start()
    else:  # SQLite has no server to stop: an exclusive lock blocks every other process instead
        path = make_url(stack.database_url).database
        locker = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            locker.execute("COMMIT")
            locker.close()

        threading.Timer(outage, release).start()
    job = stack.wait_all([job_id])[0]
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert [m["epoch"] for m in stack.http.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]] == list(range(1, 7))
    stack.summary("database unreachable for 4 s during training", [job_id])


def test_same_message_delivered_twice(faults):
    stack = faults()
    stack.start_worker("a")
    stack.start_worker("b")
    ids = [stack.submit({**QUICK, "epochs": 20}) for _ in range(3)]
    celery = make_celery(stack.settings)
    for job_id in ids:
        celery.send_task(TRAIN_TASK, args=[job_id], queue=stack.queue)
    celery.close()
    jobs = stack.wait_all(ids)
    wait_until(lambda: stack.worker_log().count("not claimable") >= 3, 30, what="the duplicates to be refused")
    assert all(j["status"] == "succeeded" and j["attempt"] == 1 for j in jobs)
    stack.summary("every message delivered twice", ids)


def test_publish_dropped_after_commit(faults):
    """The API process dies between its commit and its publish: the outbox still gets the job out."""
    stack = faults()
    stack.start_worker("a")
    from sqlalchemy.orm import Session

    from kiln.db import make_engine, utcnow
    from kiln.spec import JobSpec
    from kiln.tables import Job, JobStatus

    engine = make_engine(stack.database_url)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with Session(engine) as session, session.begin():
        spec = JobSpec.model_validate({**QUICK, "time_limit_s": 600}).model_dump(mode="json")
        for job_id in ids:  # committed exactly as the API commits, and never published
            session.add(Job(id=job_id, owner="default", status=JobStatus.queued, spec=spec, queue=stack.queue,
                            created_at=utcnow(),
                            epochs_completed=0, checkpoint_epoch=0, attempt=0, cancel_requested=False))
    engine.dispose()
    jobs = stack.wait_all(ids)
    assert all(j["status"] == "succeeded" for j in jobs)
    stack.summary("publish dropped after the commit", ids)


def test_job_longer_than_the_visibility_timeout(faults):
    stack = faults(visibility_timeout_s="2")
    stack.start_worker("a")
    stack.start_worker("b")
    job_id = stack.submit({**SLOW, "epochs": 60})  # some seconds: longer than the 2 s visibility timeout
    job = stack.wait_all([job_id])[0]
    assert job["status"] == "succeeded" and job["attempt"] == 1
    # Redis really did hand the message to someone else while the first worker was training.
    assert re.search(rf"job {job_id}: not claimable", stack.worker_log())
    stack.summary("job longer than the visibility timeout", [job_id])


def test_sigterm_hands_the_job_back(faults):
    stack = faults()
    stack.start_worker("a")
    finished = stack.submit({**QUICK, "epochs": 2})
    stack.wait_all([finished])
    job_id = stack.submit({**SLOW, "epochs": 10})
    stack.wait_job(job_id, lambda j: j["epochs_completed"] >= 2)
    stack.workers["a"].send_signal(signal.SIGTERM)
    stack.workers.pop("a").wait(20)  # prompt: it does not train on to the end
    handed = stack.wait_job(job_id, lambda j: j["status"] == "queued", timeout=10)
    assert handed["worker"] is None
    stack.start_worker("b")
    job = stack.wait_all([job_id])[0]
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert [e["kind"] for e in stack.events(job_id)] == ["queued", "claimed", "handed_back", "claimed", "succeeded"]
    assert stack.job(finished)["attempt"] == 1, "a finished job never runs again"
    figures = stack.summary("SIGTERM on a worker mid-job", [finished, job_id])
    assert figures["epochs_redone"] == 1, "only the epoch it was in"


@pytest.mark.skipif(bool(os.environ.get("KILN_TEST_DATABASE_URL")), reason="SQLite-specific")
def test_sqlite_with_two_worker_processes(faults):
    stack = faults()
    stack.start_worker("a", concurrency=2)
    ids = [stack.submit({**QUICK, "epochs": 50}) for _ in range(4)]
    jobs = stack.wait_all(ids, timeout=300)
    assert all(j["status"] == "succeeded" for j in jobs)
    logs = stack.worker_log() + (stack.tmp / "api.log").read_text()
    assert "database is locked" not in logs
    stack.summary("SQLite, 4 jobs x 50 epochs on 2 worker processes", ids)


def test_cancel_while_the_worker_is_lost(faults):
    """A job asked to stop whose worker then vanished is cancelled, not trained again."""
    stack = faults()
    stack.start_worker("a")
    job_id = stack.submit({**SLOW, "epochs": 50})
    stack.wait_job(job_id, lambda j: j["epochs_completed"] >= 1)
    for process in psutil.Process(stack.workers["a"].pid).children(recursive=True):
        process.send_signal(signal.SIGSTOP)  # the worker freezes: no heartbeat, no batch boundary
    assert stack.http.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    stack.kill_worker("a")
    stack.start_worker("b")
    job = stack.wait_all([job_id], timeout=60)[0]
    assert job["status"] == "cancelled" and job["attempt"] == 1, job
    assert stack.events(job_id)[-1]["kind"] == "cancelled"
    stack.summary("cancel requested, then the worker lost", [job_id])
