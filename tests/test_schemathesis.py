"""Property-based testing of the HTTP API with schemathesis, against a live kiln and its served OpenAPI document.

schemathesis generates requests from /openapi.json (examples, boundary values, fuzzed and invalid data) and follows
the document's links (create -> get -> metrics -> cancel, ...) in stateful scenarios; every answer is checked for
server errors and against the document (status code, content type, body schema). The figures of the latest run are
in SECURITY.md.

It runs against a kiln of its own, beside the suite's stack: its own database, artifact directory and queues on the
same broker, an API server and a predictor. A trainer runs only while a few seed jobs train (so that succeeded,
failed, cancelled and queued jobs, weights, predictions and an upload exist to be found); then it stops, and the
hundreds of jobs that schemathesis submits stay queued, costing nothing, instead of keeping the suite's worker busy
with specs as large as the schema allows.

KILN_SCHEMATHESIS_EXAMPLES (default 60, per operation and phase) and KILN_SCHEMATHESIS_SEED (default 1) set the depth
and the seed; a deep run is e.g. `KILN_SCHEMATHESIS_EXAMPLES=1000 scripts/test.sh tests/test_schemathesis.py -s
--timeout=0` (the default run takes about 30 s of schemathesis, and under a minute with its kiln).
"""

import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import schemathesis

from api.routes.jobs import SPEC_EXAMPLES
from kiln.catalog import BUILTIN_DATASETS
from kiln.client import TERMINAL
from kiln.dispatch import make_celery, predict_queue
from kiln.embedded import free_port, wait_until
from kiln.launch import worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings
from kiln.spec import JobSpec
from tests.conftest import Stack, _api_ready, api_command, start_process, stop_process

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("KILN_SCHEMATHESIS_EXAMPLES", "60"))
SEED = int(os.environ.get("KILN_SCHEMATHESIS_SEED", "1"))
# Server errors, and conformance to the document; and ignored_auth: an operation that declares the bearer scheme,
# sent without a key or with a wrong one, must refuse it.
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "ignored_auth"]

# An event stream of a job that never ends (they stay queued here) is read until the request timeout: keep that
# short for the one streaming route, and its examples few. And a JobSpec names a dataset by a free string that only
# a few values fit: draw data.dataset mostly from the built-in names, so that generated specs are often valid and
# the stateful walk gets jobs to follow (the other fields are generated freely, and invalid ones are still sent).
CONFIG = f"""
[dictionaries.datasets]
values = {json.dumps(sorted(BUILTIN_DATASETS))}

[[operations]]
include-path = "/v1/jobs/{{job_id}}/events"
request-timeout = 1.0
max-stream-events = 3

[operations.generation]
max-examples = 5

[[operations]]
include-path = "/v1/jobs"
include-method = "POST"

[operations.parameters]
"body.data.dataset" = {{ dictionary = "datasets", probability = 0.9 }}
"""

# The stateful phase picks its links at random; that it followed some out of a created job is required here, and
# test_the_documented_links_walk_create_get_metrics_cancel walks that chain itself, link by link.
FROM_CREATE = re.compile(r"^POST /v1/jobs -> \[20[01]\] ")

SEED_JOBS = {
    "classifier": {"name": "seed-iris", "data": {"dataset": "iris"}, "model": {"type": "mlp", "hidden": [8]},
                   "epochs": 2},
    "regressor": {"name": "seed-diabetes", "data": {"dataset": "diabetes"}, "model": {"type": "mlp", "hidden": [8]},
                  "epochs": 2},
    "autoencoder": {"name": "seed-autoencoder", "data": {"dataset": "wine"}, "epochs": 2,
                    "model": {"type": "autoencoder", "encoder": [8], "latent": 2}},
    "diverges": {"name": "seed-diverges", "data": {"dataset": "regression", "samples": 200}, "epochs": 3,
                 "optimizer": {"type": "sgd", "lr": 10}, "model": {"type": "mlp", "hidden": [64, 64]}},
}


@pytest.fixture(scope="module")
def target(stack, make_database, tmp_path_factory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    database_url = make_database()
    upgrade(database_url)
    queue = f"kiln-fuzz-{uuid.uuid4().hex[:8]}"
    env = {**stack.env, "KILN_DATA_DIR": str(data_dir), "KILN_DATABASE_URL": database_url, "KILN_QUEUE": queue,
           # A predictor runs: a 503 would be a real fault here, not a slow first model load on a busy machine.
           "KILN_PREDICT_TIMEOUT_S": "30",
           # Jobs stay queued here, and the run submits hundreds: lift the per-owner limit on active jobs (429).
           "KILN_MAX_ACTIVE_JOBS": "1000000"}
    settings = Settings(data_dir=data_dir, database_url=database_url, broker_url=stack.settings.broker_url, queue=queue)
    port = free_port()
    fuzz = Stack(url=f"http://127.0.0.1:{port}", api_key=stack.api_key, env=env, settings=settings, logs=stack.logs)
    host = f"{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    trainer, predictor = f"fuzz-train-{host}", f"fuzz-predict-{host}"
    fuzz.processes["fuzz-worker"] = start_process(worker_command(1, queue, trainer), env, stack.logs / "fuzz-worker.log")
    fuzz.processes["fuzz-predictor"] = start_process(worker_command(1, predict_queue(settings), predictor), env,
                                                     stack.logs / "fuzz-predictor.log")
    fuzz.processes["fuzz-api"] = start_process(api_command(port), env, stack.logs / "fuzz-api.log")
    celery = make_celery(settings)
    try:
        wait_until(lambda: _api_ready(fuzz), timeout=60, interval=0.1, what="the fuzz target's API server")
        for name in (trainer, predictor):
            wait_until(lambda n=name: celery.control.ping([n], timeout=0.5), timeout=60, what=f"worker {name}")
        with fuzz.client() as client:
            seeded = _seed(fuzz, client)
            stop_process(fuzz.processes.pop("fuzz-worker"))  # from here on, submitted jobs stay queued
            for name in ("seed-queued", "seed-cancelled"):
                seeded[name] = client.post("/v1/jobs", json={"name": name, "data": {"dataset": "iris"}}).json()["id"]
            assert client.post(f"/v1/jobs/{seeded['seed-cancelled']}/cancel").status_code == 202
            assert client.get(f"/v1/jobs/{seeded['seed-queued']}").json()["status"] == "queued"
        fuzz.seeded = seeded  # job ids by name (schemathesis may submit jobs of the same names: it reuses values)
        yield fuzz
    finally:
        for process in fuzz.processes.values():
            stop_process(process)
        celery.close()
        with redis.Redis.from_url(settings.broker_url) as broker:  # what this kiln left on a shared broker
            broker.delete(queue, predict_queue(settings), *broker.keys(f"_kombu.binding*{queue}*"))


def _seed(fuzz: Stack, client: httpx.Client) -> dict[str, str]:
    """Succeeded jobs of each kind (weights, an encoder, predictions), a failed one, and an upload trained on."""
    rng = np.random.default_rng(0)
    rows = "\n".join(f"{a:.4f},{b:.4f},{int(a + b > 0)}" for a, b in rng.normal(size=(40, 2)))
    upload = client.post("/v1/datasets", files={"file": ("seed.csv", f"a,b,y\n{rows}\n".encode())},
                         data={"name": "seed-upload", "target": "y"})
    assert upload.status_code == 201, upload.text
    specs = {**SEED_JOBS, "on-upload": {"name": "seed-on-upload", "data": {"dataset": upload.json()["id"]},
                                         "epochs": 1}}
    ids = {}
    for what, spec in specs.items():
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 201, (what, response.text)
        ids[what] = response.json()["id"]
    for what, job_id in ids.items():
        job = fuzz.wait_for_job(client, job_id, lambda j: j["status"] in TERMINAL, timeout=180)
        assert job["status"] == ("failed" if what == "diverges" else "succeeded"), (what, job)
    return {specs[what]["name"]: job_id for what, job_id in ids.items()}


def seed_job(target: Stack, name: str) -> dict:
    with target.client() as client:
        return client.get(f"/v1/jobs/{target.seeded[name]}").json()


def run_schemathesis(target: Stack, workdir: Path) -> tuple[dict, set[str], str]:
    """Runs the schemathesis CLI (as CI or a person would) against the target; returns its JSON report, the ids of
    the stateful transitions it followed, and its console output."""
    report, events, config = workdir / "report.json", workdir / "events.ndjson", workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{target.url}/openapi.json",
        "--header", f"Authorization: Bearer {target.api_key}",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--checks", ",".join(CHECKS),
        "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--continue-on-failure", "--request-timeout", "60", "--generation-database", "none",
        "--report", "json,ndjson", "--report-json-path", str(report), "--report-ndjson-path", str(events),
        "--no-color",
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert report.exists(), output[-5000:]
    followed = set(re.findall(r'"transition":\{"id":"([^"]+)"', events.read_text()))
    return json.loads(report.read_text()), followed, output


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(target, tmp_path):
    report, followed, output = run_schemathesis(target, tmp_path)
    cases = report["test_cases"]
    operations = report["operations"]
    print(
        f"\nschemathesis {report['schemathesis_version']} (seed {report['seed']}, {EXAMPLES} examples): "
        f"{operations['tested']}/{operations['total']} operations, {cases['generated']} cases, "
        f"{cases['with_failures']} with failures ({cases['unique_failures']} unique), {cases['errored']} errored, "
        f"{len(followed)} distinct links followed, {report['running_time']:.0f} s"
    )
    assert report["failures"] == [] and cases["with_failures"] == 0, output[-20000:]
    assert report["errors"] == [] and cases["errored"] == 0, output[-20000:]
    assert operations["tested"] == operations["total"] >= 13, operations
    assert {name: phase["status"] for name, phase in report["phases"].items()} == dict.fromkeys(
        ("examples", "coverage", "fuzzing", "stateful"), "success"), report["phases"]
    assert report["stop_reason"] == "completed"

    # The stateful phase followed links out of created jobs.
    assert any(FROM_CREATE.match(t) for t in followed), sorted(followed)


def test_the_documented_links_walk_create_get_metrics_cancel(target):
    """create -> get -> metrics -> cancel -> get, each step reached by following the link the served document
    declares on the previous answer (its runtime expression evaluated on that answer), each answer checked by
    schemathesis."""
    document = httpx.get(f"{target.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_url(f"{target.url}/openapi.json")
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    auth = {"Authorization": f"Bearer {target.api_key}"}
    by_id = {op["operationId"]: (path, method.upper()) for path, ops in document["paths"].items()
             for method, op in ops.items()}

    path, method = by_id["createJob"]
    case = schema[path][method].Case(body=SPEC_EXAMPLES["minimal"]["value"], media_type="application/json")
    response = case.call_and_validate(headers=auth, checks=checks)
    walked = [("createJob", response.status_code)]
    for step in ("getJob", "getJobMetrics", "cancelJob", "getJob"):
        source, status = walked[-1]
        source_path, source_method = by_id[source]
        links = document["paths"][source_path][source_method.lower()]["responses"][str(status)]["links"]
        (link,) = [link for link in links.values() if link["operationId"] == step]
        answer = response.json()
        parameters = {name: _evaluate(expression, answer) for name, expression in link["parameters"].items()}
        path, method = by_id[step]
        response = schema[path][method].Case(path_parameters=parameters).call_and_validate(headers=auth, checks=checks)
        walked.append((step, response.status_code))
    assert walked == [("createJob", 201), ("getJob", 200), ("getJobMetrics", 200), ("cancelJob", 202), ("getJob", 200)]
    assert response.json()["status"] == "cancelled", "the walk ended on the job it created, now cancelled"


def _evaluate(expression: str, body) -> str:
    """An OpenAPI runtime expression of the form $response.body#/json/pointer."""
    prefix = "$response.body#"
    assert expression.startswith(prefix), expression
    for part in expression[len(prefix):].lstrip("/").split("/"):
        body = body[int(part)] if isinstance(body, list) else body[part]
    return body


def test_the_documented_examples_are_valid_specs(target):
    """The request examples in the document (which schemathesis replays first) are specs the API accepts."""
    document = httpx.get(f"{target.url}/openapi.json", timeout=30).json()
    served = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert served.keys() == SPEC_EXAMPLES.keys()
    for name, example in served.items():
        JobSpec.model_validate(example["value"])
        with target.client() as client:  # accepted by the live API too (the fuzz target: they stay queued)
            response = client.post("/v1/jobs", json=example["value"])
            assert response.status_code == 201, (name, response.text)


def test_every_answer_on_a_succeeded_job_conforms(target):
    """Responses that need finished jobs, checked directly with schemathesis's checks (the generated run reaches
    them too, but not every time): job, metrics, history, weights, encoder and predictions, per seed job."""
    schema = schemathesis.openapi.from_url(f"{target.url}/openapi.json")
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    auth = {"Authorization": f"Bearer {target.api_key}"}
    names = ["seed-iris", "seed-diabetes", "seed-autoencoder", "seed-diverges", "seed-on-upload", "seed-queued",
             "seed-cancelled"]
    jobs = {name: seed_job(target, name) for name in names}
    rows = {"seed-iris": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], "seed-diabetes": [[0.01] * 10],
            "seed-autoencoder": [[13.0, 2.0, 2.4, 19.0, 100.0, 2.3, 2.0, 0.3, 1.6, 5.0, 1.0, 2.6, 750.0]],
            "seed-on-upload": [[0.5, -0.5]], "seed-diverges": [[0.0] * 10]}
    for name, job in jobs.items():
        calls = [("/v1/jobs/{job_id}", "GET", {}, None), ("/v1/jobs/{job_id}/metrics", "GET", {}, None),
                 ("/v1/jobs/{job_id}/metrics", "GET", {"since": 1}, None), ("/v1/jobs/{job_id}/history", "GET", {}, None),
                 ("/v1/jobs/{job_id}/weights", "GET", {}, None), ("/v1/jobs/{job_id}/weights", "GET", {"part": "encoder"}, None),
                 ("/v1/jobs/{job_id}/cancel", "POST", {}, None)]
        if name in rows:
            calls.append(("/v1/jobs/{job_id}/predict", "POST", {}, {"inputs": rows[name]}))
        for path, method, query, body in calls:
            operation = schema[path][method]
            kwargs = {"body": body} if body is not None else {}
            case = operation.Case(path_parameters={"job_id": job["id"]}, query=query, **kwargs)
            response = case.call_and_validate(headers=auth, checks=checks)
            assert response.status_code < 500, (name, method, path, response.text)


def test_predictions_are_finite_numbers_or_a_422(target):
    with target.client() as client:
        for name, width in (("seed-iris", 4), ("seed-diabetes", 10)):
            job_id = seed_job(target, name)["id"]
            response = client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[3.0e38] * width]})
            assert response.status_code in (200, 422), response.text
            if response.status_code == 200:
                answer = response.json()
                values = answer["predictions"] + [p for row in answer["probabilities"] or [] for p in row]
                assert all(isinstance(v, int | float) and math.isfinite(v) for v in values), (name, answer)
