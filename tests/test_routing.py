"""Routing by resources: a spec's device and queue choose a Celery queue, `kiln worker` serves queues by what its
host has, and a job nobody can serve stays queued with the reason on it. Real API, broker, workers and CLI."""

import json
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import redis
from sqlalchemy import event
from sqlalchemy.orm import Session

from kiln.devices import Gpu, parse_nvidia_smi, visible
from kiln.dispatch import train_queue, worker_queues
from kiln.embedded import wait_until
from kiln.launch import choose_gpus, plan, worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings
from kiln.spec import ResourcesSpec
from kiln.tables import JobStatus, Worker
from kiln.workers import report
from tests.conftest import ROOT, start_process, stop_process

SMALL = {"data": {"dataset": "iris"}, "model": {"type": "mlp", "hidden": [8]}, "epochs": 2}
GPUS = [Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 79.6), Gpu(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", 79.6)]


# ---- the pure parts ----------------------------------------------------------------------------------


def test_resources_choose_the_queue():
    s = Settings(queue="kiln")
    assert train_queue(s, ResourcesSpec()) == "kiln"
    assert train_queue(s, ResourcesSpec(device="cuda")) == "kiln.gpu"
    assert train_queue(s, ResourcesSpec(device="auto")) == "kiln.auto"
    assert train_queue(s, ResourcesSpec(device="cuda", queue="a100")) == "kiln.a100"
    assert worker_queues(s, gpu=True, extra=("a100",)) == ["kiln.gpu", "kiln.auto", "kiln.a100"]
    assert worker_queues(s, gpu=False) == ["kiln", "kiln.auto"]


def test_a_gpu_host_runs_one_pinned_process_per_gpu():
    s = Settings(queue="kiln", worker_concurrency=3)
    procs = plan(s, role="train", gpus=GPUS, concurrency=None, extra_queues=(), host="h", tag="7")
    assert [(p.name, p.concurrency, p.env["CUDA_VISIBLE_DEVICES"]) for p in procs] == [
        ("kiln-gpu0-7@h", 1, "GPU-aaaa"), ("kiln-gpu1-7@h", 1, "GPU-bbbb")]
    assert all(p.queues == ["kiln.gpu", "kiln.auto"] for p in procs)
    # Asked for CPU processes too: they see no GPU, so an "auto" job taken there never lands on a pinned GPU.
    procs = plan(s, role="train", gpus=GPUS[:1], concurrency=2, extra_queues=("big",), host="h", tag="7")
    assert [(p.concurrency, p.queues, p.env["CUDA_VISIBLE_DEVICES"]) for p in procs] == [
        (1, ["kiln.gpu", "kiln.auto", "kiln.big"], "GPU-aaaa"), (2, ["kiln", "kiln.auto", "kiln.big"], "")]
    # A CPU host: the setting's pool size, on the CPU queue.
    (cpu,) = plan(s, role="train", gpus=[], concurrency=None, extra_queues=(), host="h", tag="7")
    assert (cpu.concurrency, cpu.queues) == (3, ["kiln", "kiln.auto"])


def test_gpu_choice_and_device_discovery():
    assert choose_gpus("auto", []) == [] and choose_gpus("auto", GPUS) == GPUS
    assert choose_gpus("1", GPUS) == [GPUS[1]] and choose_gpus("none", GPUS) == []
    with pytest.raises(ValueError, match="finds no GPU"):
        choose_gpus("all", [])
    with pytest.raises(ValueError, match=r"has no GPU 3 \(it has: 0, 1\)"):
        choose_gpus("0,3", GPUS)
    with pytest.raises(ValueError, match="indices such as 0,2"):
        choose_gpus("first", GPUS)
    assert parse_nvidia_smi("0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559\nNo devices were found\n") == [
        Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 79.6)]
    assert visible(GPUS, "1") == [GPUS[1]] and visible(GPUS, "GPU-bbbb,0") == [GPUS[1], GPUS[0]]
    assert visible(GPUS, "") == [] and visible(GPUS, "7,0") == []  # CUDA stops at the first unknown entry


def test_a_queued_jobs_reason_reads_the_registry_at_most_once_a_second(engine, monkeypatch):
    from api.services import jobs as service

    monkeypatch.setattr(service, "_live", service._live)  # this test's snapshot, none of another's
    reads = []
    event.listen(engine, "before_cursor_execute",
                 lambda *a: reads.append(a[2]) if a[2].startswith("SELECT") and "FROM workers" in a[2] else None)
    job = SimpleNamespace(id="j", status=JobStatus.queued, queue="kiln.gpu", spec={"resources": {"device": "cuda"}})
    with Session(engine) as session:
        assert service.waiting(session, [job]) == {
            "j": "no live worker takes jobs from queue 'kiln.gpu'; start `kiln worker` on a host with an NVIDIA GPU"}
        assert service.waiting(session, [SimpleNamespace(id="r", status=JobStatus.running)]) == {}  # no read at all
        report(session, Worker(name="w@h", host="h", pid=1, queues=["kiln.gpu"], concurrency=1,
                               devices=[{"id": "cpu", "kind": "cpu"}], version="test"))
        assert "j" in service.waiting(session, [job]) and len(reads) == 1, "within the second: the snapshot"
        monkeypatch.setattr(service, "LIVE_WORKERS_MAX_AGE_S", 0.0)  # as if a second had passed
        assert service.waiting(session, [job]) == {
            "j": "the live workers on queue 'kiln.gpu' have no usable GPU; "
                 "start `kiln worker` on a host with an NVIDIA GPU"}
    assert len(reads) == 2


# ---- over HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resources", "field", "words"), [
    ({"device": "cuda", "gpus": 2}, "body.resources.gpus", "several GPUs at once are not supported"),
    ({"gpus": 1}, "body.resources.gpus", "needs device 'cuda'"),
    ({"queue": "predict"}, "body.resources.queue", "kiln's own"),
    ({"queue": "../etc"}, "body.resources.queue", "not a queue name"),
    ({"device": "tpu"}, "body.resources.device", ""),
])
def test_resources_that_cannot_be_served_are_refused_and_nothing_is_queued(client, resources, field, words):
    before = client.get("/v1/jobs", params={"limit": 200}).json()["items"]
    response = client.post("/v1/jobs", json={**SMALL, "resources": resources})
    assert response.status_code == 422, response.text
    detail = next(d for d in response.json()["error"]["details"] if d["field"] == field)
    assert words in detail["message"]
    assert client.get("/v1/jobs", params={"limit": 200}).json()["items"] == before


def test_a_gpu_job_waits_with_its_reason_and_never_runs_on_a_cpu_worker(stack, client):
    gpu_job = client.post("/v1/jobs", json={**SMALL, "resources": {"device": "cuda", "precision": "bf16"}}).json()
    gpu_queue = f"{stack.settings.queue}.gpu"
    assert gpu_job["status"] == "queued" and gpu_job["spec"]["resources"]["gpus"] == 1
    assert gpu_job["waiting_reason"] == (
        f"no live worker takes jobs from queue {gpu_queue!r}; start `kiln worker` on a host with an NVIDIA GPU")
    # It holds up nothing: CPU and "auto" jobs submitted after it run on the stack's CPU worker.
    cpu_job = client.post("/v1/jobs", json=SMALL).json()
    auto_job = client.post("/v1/jobs", json={**SMALL, "resources": {"device": "auto"}}).json()
    for job in (cpu_job, auto_job):
        assert stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")["waiting_reason"] is None
        claimed = client.get(f"/v1/jobs/{job['id']}/history").json()["events"][1]["message"]
        assert " on cpu (attempt 1)" in claimed

    # A CPU-only worker started on the GPU queue by mistake takes the message and refuses the job.
    name = f"misrouted-{uuid.uuid4().hex[:6]}@test"
    log = stack.logs / "misrouted.log"
    worker = start_process(worker_command(1, gpu_queue, name), stack.env, log)
    try:
        wait_until(lambda: "needs a CUDA GPU" in log.read_text(errors="replace"), timeout=60,
                   what="the CPU-only worker to refuse the GPU job")
        # The API reads the live workers at most once a second, so the new reason may take that long to show.
        reason = (f"the live workers on queue {gpu_queue!r} have no usable GPU; "
                  "start `kiln worker` on a host with an NVIDIA GPU")
        job = stack.wait_for_job(client, gpu_job["id"], lambda j: j["waiting_reason"] == reason, timeout=10)
        assert job["status"] == "queued" and job["attempt"] == 0
        assert [e["kind"] for e in client.get(f"/v1/jobs/{gpu_job['id']}/history").json()["events"]] == ["queued"]
    finally:
        stop_process(worker)
    assert client.post(f"/v1/jobs/{gpu_job['id']}/cancel").json()["status"] == "cancelled"


def test_a_named_pool_serves_its_jobs_once_kiln_worker_joins_it(stack, client, make_database):
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    job = client.post("/v1/jobs", json={**SMALL, "resources": {"queue": pool}}).json()
    assert job["waiting_reason"] == (f"no live worker takes jobs from queue '{stack.settings.queue}.{pool}'; "
                                     f"start one with `kiln worker --queue {pool}`")
    log = stack.logs / f"{pool}.log"
    worker = start_process([sys.executable, "-m", "kiln.cli", "worker", "--queue", pool, "--gpus", "none"],
                           stack.env, log)
    try:
        done = stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")
        assert done["worker"].startswith("kiln-") and done["waiting_reason"] is None
        (me,) = [w for w in client.get("/v1/workers").json()["items"] if w["name"] == done["worker"]]
        assert stack.kiln("worker-health").returncode == 0  # the container healthcheck of a worker host
        nobody = make_database()  # a deployment where no worker on this host has reported
        upgrade(nobody)
        unhealthy = stack.kiln("worker-health", KILN_DATABASE_URL=nobody)
        assert unhealthy.returncode == 1 and "has reported within KILN_LEASE_S" in unhealthy.stderr
        assert me["queues"] == sorted([stack.settings.queue, f"{stack.settings.queue}.auto",
                                       f"{stack.settings.queue}.{pool}"])
    finally:
        stop_process(worker)
    assert worker.returncode == 0, log.read_text()


def test_kiln_worker_supervises_one_process_per_gpu(stack, client, tmp_path):
    """The multi-process path of `kiln worker`, as on a 2-GPU host (the GPUs here are pretend: the processes
    are real Celery workers, pinned to GPU ids that this host lacks, so they report no usable GPU)."""
    tag = uuid.uuid4().hex[:6]
    script = (
        "import sys; from kiln.launch import plan, run; from kiln.settings import get_settings; "
        "from tests.test_routing import GPUS; "
        f"sys.exit(run(plan(get_settings(), role='train', gpus=GPUS, concurrency=None, extra_queues=(), "
        f"host='test', tag='{tag}')))"
    )
    names = [f"kiln-gpu0-{tag}@test", f"kiln-gpu1-{tag}@test"]

    def registered(state: str) -> bool:
        workers = {w["name"]: w for w in client.get("/v1/workers").json()["items"]}
        return all(workers.get(n, {}).get("state") == state for n in names)

    log = tmp_path / "supervisor.log"
    supervisor = subprocess.Popen([sys.executable, "-c", script], env=stack.env, cwd=ROOT, stdout=log.open("ab"),
                                  stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: registered("online"), timeout=90, what="both GPU processes to register")
        workers = {w["name"]: w for w in client.get("/v1/workers").json()["items"]}
        assert all(workers[n]["queues"] == sorted([f"{stack.settings.queue}.gpu", f"{stack.settings.queue}.auto"])
                   for n in names)
        supervisor.send_signal(signal.SIGTERM)  # passed on to each; they stop cleanly and say so
        assert supervisor.wait(60) == 0, log.read_text()
        wait_until(lambda: registered("stopped"), timeout=30, what="both GPU processes to stop")
    finally:
        stop_process(supervisor)


def test_a_message_taken_by_a_worker_lost_before_its_claim_is_published_again(stack, client):
    """A worker took the message (it sits in kombu's unacked hash) and vanished before claiming the job: the
    reconciler must not wait for the visibility timeout (hours) to notice."""
    pool = f"pool-{uuid.uuid4().hex[:6]}"  # served by nobody, so the job stays queued while we look
    job = client.post("/v1/jobs", json={**SMALL, "resources": {"queue": pool}}).json()
    queue = f"{stack.settings.queue}.{pool}"
    tag = f"test-{uuid.uuid4().hex}"
    with redis.Redis.from_url(stack.settings.broker_url) as r:
        raw = wait_until(lambda: r.lpop(queue), timeout=30, what="the job's message")
        # As kombu keeps a delivered message: [payload, exchange, routing key], delivered a minute ago.
        r.hset("unacked", tag, json.dumps([json.loads(raw), queue, queue]))
        r.zadd("unacked_index", {tag: time.time() - 60})
        try:
            wait_until(lambda: r.llen(queue) == 1, timeout=60, what="the reconciler to publish the job again")
            kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}/history").json()["events"]]
            assert kinds == ["queued", "message_lost"]
        finally:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)
            r.delete(queue)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
