"""S3-compatible artifact storage against a real S3 server (moto, started here on loopback): the store on its own,
then kiln end to end with an API server and workers that share no directory, only the bucket."""

import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
import torch
from safetensors.torch import load

from kiln.client import TERMINAL
from kiln.dispatch import make_celery, predict_queue, worker_queues
from kiln.embedded import free_port, stop_process, wait_until
from kiln.launch import worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings
from kiln.storage import DATASET, ENCODER, WEIGHTS, S3Store, StoreUnavailable, checkpoint_name
from tests import test_faults
from tests.conftest import Stack, _api_ready, answers, api_command, second_api, start_process, wait_for_job
from tests.test_storage import check_checkpoint_lifecycle

pytestmark = pytest.mark.e2e

BUCKET = "kiln-artifacts"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# test_faults' SLOW job on a quarter of its rows: a tenth of a second an epoch here (idle), still long enough to
# kill the worker mid-job, and short enough to train twice (killed, and the uninterrupted reference).
SLOW = {**test_faults.SLOW, "data": {"dataset": "regression", "samples": 3000}}


@pytest.fixture(scope="module")
def credentials() -> Iterator[None]:
    """Credentials as boto3's chain finds them in production: in the environment, never in kiln's settings."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory, credentials) -> Iterator[str]:
    """A moto S3 server in its own process, and the bucket kiln is configured with."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = start_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], dict(os.environ),
                           log)
    url = f"http://127.0.0.1:{port}"

    try:
        wait_until(lambda: answers(f"{url}/moto-api/", server, log), 60, 0.1, "the moto S3 server")
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        stop_process(server)


def s3_client(url: str):
    return boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1")


def keys(url: str, prefix: str) -> set[str]:
    pages = s3_client(url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def prefix() -> str:
    return f"unit/{uuid.uuid4().hex[:8]}"  # each test on keys of its own


@pytest.fixture
def store(s3_url, prefix) -> S3Store:
    return S3Store(BUCKET, prefix, s3_url, "us-east-1")


# --- the store ----------------------------------------------------------------------------------------------


def test_put_and_open_round_trip(store, s3_url, prefix, tmp_path):
    job_id, dataset_id = str(uuid.uuid4()), str(uuid.uuid4())
    assert store.open_artifact(job_id, WEIGHTS) is None, "a missing key is None, not an error"
    assert store.open_dataset(dataset_id) is None

    store.put_dataset(dataset_id, b"arrays")
    with store.open_dataset(dataset_id) as file:
        assert file.read() == b"arrays"

    content = os.urandom(9 << 20)  # over upload_file's 8 MiB threshold: a multipart upload
    local = tmp_path / WEIGHTS
    local.write_bytes(content)
    store.put_artifact(job_id, WEIGHTS, local)
    assert not local.exists(), "put takes ownership of the local file"
    with store.open_artifact(job_id, WEIGHTS) as file:
        # What the API's download route needs: a size from fstat, and a file it can hash and rewind.
        assert os.fstat(file.fileno()).st_size == len(content)
        assert hashlib.file_digest(file, "sha256").digest() == hashlib.sha256(content).digest()
        file.seek(0)
        assert file.read(4) == content[:4]
    assert store.open_artifact(job_id, ENCODER) is None
    assert keys(s3_url, prefix) == {f"{prefix}/jobs/{job_id}/{WEIGHTS}", f"{prefix}/datasets/{dataset_id}/{DATASET}"}


def test_checkpoints_put_fetch_and_drop(store, s3_url, prefix, tmp_path):
    job_id = str(uuid.uuid4())
    directory = f"{prefix}/jobs/{job_id}/checkpoints/"
    check_checkpoint_lifecycle(store, job_id, tmp_path,
                               lambda: {key.removeprefix(directory) for key in keys(s3_url, prefix)})


def test_each_epoch_drops_the_checkpoint_it_replaced_in_one_request(store, s3_url, prefix, tmp_path):
    # The worker's per-epoch cleanup, as the worker calls it: one DELETE, where listing the job's checkpoints to
    # keep the newest cost a LIST and a DELETE every epoch.
    job_id = str(uuid.uuid4())
    for epoch in (1, 2):
        (tmp_path / "c").write_bytes(b"c")
        store.put_checkpoint(job_id, epoch, tmp_path / "c")
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    store.drop_checkpoint(job_id, 1)
    assert sent == ["DELETE"]
    assert keys(s3_url, prefix) == {f"{prefix}/jobs/{job_id}/checkpoints/{checkpoint_name(2)}"}


@pytest.mark.parametrize("job_id", ["../x", str(uuid.uuid4()).upper(), f"{uuid.uuid4()}/..", ""])
def test_keys_come_from_canonical_ids_only(store, job_id, tmp_path):
    for call in (lambda: store.open_artifact(job_id, WEIGHTS), lambda: store.open_dataset(job_id),
                 lambda: store.put_checkpoint(job_id, 1, tmp_path / "c"), lambda: store.drop_checkpoints(job_id),
                 lambda: store.drop_checkpoint(job_id, 1)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        store.open_artifact(str(uuid.uuid4()), "../../secret")


def test_failures_are_sentences(s3_url, tmp_path, monkeypatch):
    job_id = str(uuid.uuid4())
    with pytest.raises(StoreUnavailable, match=r"the bucket 'no-such-bucket' does not exist"):
        S3Store("no-such-bucket", "", s3_url).open_artifact(job_id, WEIGHTS)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        (tmp_path / "c").write_bytes(b"c")
        S3Store("no-such-bucket", "", s3_url).put_checkpoint(job_id, 1, tmp_path / "c")
    assert (tmp_path / "c").exists(), "a failed upload leaves the local file"

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable, match=rf"s3://{BUCKET}/ at {nobody} failed while reading .*S3 is unreachable"):
        S3Store(BUCKET, "", nobody).open_artifact(job_id, WEIGHTS)

    for name in CREDENTIALS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreUnavailable, match="no AWS credentials were found; set AWS_ACCESS_KEY_ID"):
        S3Store(BUCKET, "", s3_url, "us-east-1").open_artifact(job_id, WEIGHTS)


def test_dropping_checkpoints_is_best_effort(caplog):
    """A checkpoint left behind only costs storage; failing to delete it must not fail the job."""
    with caplog.at_level(logging.WARNING, logger="kiln.storage"):
        nobody = S3Store(BUCKET, "", f"http://127.0.0.1:{free_port()}")
        nobody.drop_checkpoint(str(uuid.uuid4()), 2)
        nobody.drop_checkpoints(str(uuid.uuid4()))
    assert caplog.text.count("S3 is unreachable") == 2


# --- end to end: an API and workers that share nothing but the bucket ----------------------------------------


class S3Stack(Stack):
    """kiln on S3: an API server, a predictor and training workers, each with a data directory of its own."""

    def start_worker(self, name: str, queues: str | list[str] | None = None) -> Path:
        data_dir = self.logs.parent / f"data-{name}"  # a fresh one for each worker, as on another host
        env = {**self.env, "KILN_DATA_DIR": str(data_dir)}
        hostname = f"{name}@s3"
        queues = queues or worker_queues(self.settings, gpu=False)
        self.processes[name] = start_process(worker_command(1, queues, hostname), env, self.logs / f"{name}.log")
        celery = make_celery(self.settings)
        try:
            wait_until(lambda: celery.control.ping([hostname], timeout=0.5), 120, what=f"worker {name}")
        finally:
            celery.close()
        return data_dir

    def local_files(self) -> list[Path]:
        """Safetensors files under the data directories of the processes running now (a killed worker's scratch
        may keep what it was writing)."""
        dirs = [self.logs.parent / f"data-{name}" for name in self.processes]  # "api" is data-api
        return sorted(f for d in dirs if d.exists() for f in d.rglob("*.safetensors"))

    def kill_worker(self, name: str) -> None:
        """kill -9 the whole worker, as a host that vanished: main process and pool processes."""
        main = psutil.Process(self.processes[name].pid)
        for process in [*main.children(recursive=True), main]:
            process.kill()
        self.processes.pop(name).wait()

    def train(self, client: httpx.Client, spec: dict) -> dict:
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        job = self.wait_for_job(client, response.json()["id"], lambda j: j["status"] in TERMINAL, timeout=400)
        assert job["status"] == "succeeded", job
        return job


@pytest.fixture(scope="module")
def s3_stack(request, tmp_path_factory, make_database, broker_url, s3_url) -> Iterator[S3Stack]:
    root = tmp_path_factory.mktemp("s3-stack")
    logs = root / "logs"
    logs.mkdir()
    database_url = make_database()
    upgrade(database_url)
    api_dir = root / "data-api"
    env = {
        **{k: v for k, v in os.environ.items() if k != "KILN_ARTIFACTS_DIR"},
        "KILN_DATA_DIR": str(api_dir), "KILN_DATABASE_URL": database_url, "KILN_BROKER_URL": broker_url,
        "KILN_API_KEY": "s3-test", "KILN_QUEUE": f"s3-{uuid.uuid4().hex[:8]}",
        "KILN_S3_BUCKET": BUCKET, "KILN_S3_PREFIX": "kiln/e2e", "KILN_S3_ENDPOINT_URL": s3_url,
        "KILN_S3_REGION": "us-east-1",
        "KILN_LEASE_S": "3", "KILN_HEARTBEAT_S": "0.3", "KILN_RECONCILE_INTERVAL_S": "0.5",
        "KILN_OUTBOX_GRACE_S": "1", "KILN_LOST_MESSAGE_GRACE_S": "2",
    }
    settings = Settings(data_dir=api_dir, database_url=database_url, broker_url=broker_url, queue=env["KILN_QUEUE"])
    port = free_port()
    stack = S3Stack(url=f"http://127.0.0.1:{port}", api_key="s3-test", env=env, settings=settings, logs=logs)
    try:
        stack.processes["api"] = start_process(api_command(port), env, logs / "api.log")
        wait_until(lambda: _api_ready(stack), timeout=120, interval=0.1, what="the API server")
        stack.start_worker("predictor", predict_queue(settings))
        stack.start_worker("worker-1")
        yield stack
    finally:
        for process in stack.processes.values():
            stop_process(process)
        # The processes' logs are evidence when something failed; keep quiet otherwise.
        for log in sorted(logs.iterdir()) if request.session.testsfailed else ():
            sys.stderr.write(f"\n----- {log.name} (last lines) -----\n")
            sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")


@pytest.fixture(scope="module")
def client(s3_stack) -> Iterator[httpx.Client]:
    with s3_stack.client() as c:
        yield c


@pytest.fixture(scope="module")
def classifier_job(s3_stack, client) -> dict:
    return s3_stack.train(client, {"data": {"dataset": "iris"}, "epochs": 3, "model": {"type": "mlp", "hidden": [8]}})


def test_weights_go_to_the_bucket_and_come_back_over_http(s3_stack, client, classifier_job, s3_url):
    job_id = classifier_job["id"]
    assert keys(s3_url, f"kiln/e2e/jobs/{job_id}/") == {f"kiln/e2e/jobs/{job_id}/{WEIGHTS}"}, \
        "the weights are in the bucket, and a finished job's checkpoints are gone"
    response = client.get(f"/v1/jobs/{job_id}/weights")
    assert response.status_code == 200, response.text
    sha256 = hashlib.sha256(response.content).hexdigest()
    assert response.headers["etag"] == f'"{sha256}"'
    assert int(response.headers["content-length"]) == len(response.content)

    # The predictor reads the same weights from the bucket (its data directory holds none either).
    predicted = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"]) == 2

    # Nothing on any local disk: not under the API's data directory, not left in a worker's scratch.
    assert s3_stack.local_files() == []
    assert not (s3_stack.logs.parent / "data-api" / "artifacts").exists()


def test_autoencoder_encoder_from_the_bucket(s3_stack, client, s3_url):
    job = s3_stack.train(client, {"data": {"dataset": "iris"}, "epochs": 2,
                                  "model": {"type": "autoencoder", "encoder": [8], "latent": 2}})
    assert keys(s3_url, f"kiln/e2e/jobs/{job['id']}/") == {f"kiln/e2e/jobs/{job['id']}/{n}" for n in (WEIGHTS, ENCODER)}
    for part in ("model", "encoder"):
        response = client.get(f"/v1/jobs/{job['id']}/weights", params={"part": part})
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"', part


def test_uploaded_dataset_is_stored_in_the_bucket_and_trained_on(s3_stack, client, s3_url):
    rows = "\n".join(f"{i % 7 * 0.5:.2f},{i % 3},{int(i % 7 > 3)}" for i in range(60))
    response = client.post("/v1/datasets", files={"file": ("d.csv", f"a,b,y\n{rows}\n".encode())},
                           data={"name": "on-s3", "target": "y"})
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert keys(s3_url, f"kiln/e2e/datasets/{dataset['id']}/") == {f"kiln/e2e/datasets/{dataset['id']}/{DATASET}"}
    job = s3_stack.train(client, {"data": {"dataset": dataset["id"]}, "epochs": 2})
    assert job["epochs_completed"] == 2
    assert s3_stack.local_files() == []


@pytest.mark.timeout(900)  # two trainings and two worker starts: minutes when other test suites share the cores
def test_kill9_resumes_on_another_worker_from_the_s3_checkpoint(s3_stack, client, s3_url):
    """The worker vanishes mid-job; a fresh one with an empty data directory resumes from the checkpoint in
    the bucket, so every epoch is recorded once and the result is the uninterrupted run's."""
    response = client.post("/v1/jobs", json={**SLOW, "name": "killed"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    wait_for_job(client, job_id, lambda j: j["epochs_completed"] >= 2, timeout=400)
    workers = [name for name in s3_stack.processes if name.startswith("worker-")]
    for name in workers:
        s3_stack.kill_worker(name)
    recorded = client.get(f"/v1/jobs/{job_id}").json()["checkpoint_epoch"]
    assert recorded >= 2
    stored = keys(s3_url, f"kiln/e2e/jobs/{job_id}/checkpoints/")
    assert f"kiln/e2e/jobs/{job_id}/checkpoints/{checkpoint_name(recorded)}" in stored, stored

    fresh = s3_stack.start_worker(f"worker-{len(workers) + 1}")
    job = wait_for_job(client, job_id, lambda j: j["status"] in TERMINAL, timeout=400)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    events = client.get(f"/v1/jobs/{job_id}/history").json()["events"]
    assert [e["kind"] for e in events] == ["queued", "claimed", "worker_lost", "claimed", "succeeded"], events
    assert f"resuming from the epoch-{recorded} checkpoint" in events[3]["message"]
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]
    assert [m["epoch"] for m in metrics] == list(range(1, 9)), "each epoch recorded exactly once"
    assert {m["attempt"] for m in metrics} == {1, 2}
    assert keys(s3_url, f"kiln/e2e/jobs/{job_id}/") == {f"kiln/e2e/jobs/{job_id}/{WEIGHTS}"}
    assert list(fresh.rglob("*.safetensors")) == [], "the fresh worker's scratch is cleaned up"

    reference = s3_stack.train(client, {**SLOW, "name": "uninterrupted"})
    ref_metrics = client.get(f"/v1/jobs/{reference['id']}/metrics").json()["epochs"]
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in ref_metrics], "bit-identical resume"
    a, b = (load(client.get(f"/v1/jobs/{i}/weights").content) for i in (job_id, reference["id"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical weights"


def test_unreachable_storage_is_a_503_with_a_sentence(s3_stack, classifier_job):
    """A second API server on the same database whose S3 endpoint does not answer: downloads and uploads are
    503s that say to try again (not 500s), and the API's log says what is wrong."""
    dead_endpoint = f"http://127.0.0.1:{free_port()}"
    with second_api(s3_stack, "api-no-s3", timeout=120, KILN_S3_ENDPOINT_URL=dead_endpoint) as cut, \
            cut.client() as client:
        response = client.get(f"/v1/jobs/{classifier_job['id']}/weights")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert "try again" in response.json()["error"]["message"] and response.headers["retry-after"]
        upload = client.post("/v1/datasets", files={"file": ("d.csv", b"a,y\n" + b"1,0\n2,1\n" * 20)},
                             data={"name": "nowhere", "target": "y"})
        assert upload.status_code == 503, upload.text
    assert "S3 is unreachable" in (s3_stack.logs / "api-no-s3.log").read_text()
