"""End to end: a real API server, a real Celery worker process, a real broker and database."""

import base64
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kiln.catalog import BUILTIN_DATASETS
from kiln.dispatch import TRAIN_TASK, make_celery
from kiln.embedded import wait_until
from kiln.spec import JobSpec
from models.weights import load_weights, predict
from tests.conftest import ROOT
from worker.datasets import load_dataset, split_dataset

pytestmark = pytest.mark.e2e

DIGITS = {
    "name": "digits-e2e",
    "model": {"type": "mlp", "hidden": [64], "activation": "relu"},
    "data": {"dataset": "digits", "val_fraction": 0.2},
    "loss": "cross_entropy",
    "optimizer": {"type": "adam", "lr": 0.003},
    "epochs": 25,
    "batch_size": 32,
    "seed": 7,
}
# Long enough to still be running when the test acts on it, whatever the machine's speed.
LONG = {"name": "long", "data": {"dataset": "regression", "samples": 20000}, "epochs": 10_000, "batch_size": 8}


def test_digits_job_trains_end_to_end(stack, client):
    job = client.post("/v1/jobs", json=DIGITS).json()
    assert job["status"] == "queued"

    seen = []

    def finished(j):
        if not seen or seen[-1] != j["status"]:
            seen.append(j["status"])
        return j["status"] in {"succeeded", "failed", "cancelled"}

    job = stack.wait_for_job(client, job["id"], finished)
    assert seen == ["queued", "running", "succeeded"] or seen == ["running", "succeeded"], seen
    assert job["error"] is None and job["attempt"] == 1 and job["worker"]
    assert job["started_at"] <= job["finished_at"]
    assert job["epochs_completed"] == DIGITS["epochs"]

    history = client.get(f"/v1/jobs/{job['id']}/history").json()["events"]
    assert [e["kind"] for e in history] == ["queued", "claimed", "succeeded"]
    assert history[1]["message"] == f"claimed by {job['worker']} on cpu (attempt 1)"
    assert history[2]["message"] == "succeeded after 25 epochs" and history[2]["epoch"] == 25

    epochs = client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
    assert [m["epoch"] for m in epochs] == list(range(1, DIGITS["epochs"] + 1)), "one row per epoch"
    assert epochs[-1]["val_loss"] < 0.5 * epochs[0]["val_loss"], "validation loss falls"
    assert epochs[-1]["val_accuracy"] >= 0.95
    assert all(m["samples_per_s"] > 0 and m["duration_s"] > 0 and m["lr"] == 0.003 for m in epochs)
    assert job["latest_metrics"] == epochs[-1]
    since = client.get(f"/v1/jobs/{job['id']}/metrics", params={"since": 20}).json()["epochs"]
    assert [m["epoch"] for m in since] == [21, 22, 23, 24, 25]

    response = client.get(f"/v1/jobs/{job['id']}/weights")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert 'filename="digits-e2e.safetensors"' in response.headers["content-disposition"]
    sha = hashlib.sha256(response.content).hexdigest()
    assert response.headers["etag"] == f'"{sha}"'
    assert response.headers["digest"] == "sha-256=" + base64.b64encode(bytes.fromhex(sha)).decode()

    # The file alone rebuilds the model, and reproduces the reported validation accuracy.
    path = stack.logs / "digits.safetensors"
    path.write_bytes(response.content)
    model, meta = load_weights(path)
    spec = JobSpec.model_validate(meta["spec"])
    x, y = load_dataset(spec.data, spec.seed)
    split = split_dataset(x, y, BUILTIN_DATASETS["digits"].task, spec.data.val_fraction, spec.seed)
    raw_val = split.x_val * split.input_std + split.input_mean  # predict() takes raw inputs
    predicted = predict(model, meta, raw_val)
    accuracy = float(np.mean(predicted == split.y_val))
    assert accuracy == pytest.approx(epochs[-1]["val_accuracy"], abs=1e-6)
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize(
    "spec",
    [
        {"data": {"dataset": "breast_cancer"}, "loss": "bce", "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9}, "epochs": 5},
        {"data": {"dataset": "diabetes"}, "loss": "mse", "epochs": 5, "model": {"type": "mlp", "hidden": [16], "activation": "tanh"}},
        {"data": {"dataset": "moons", "samples": 400, "val_fraction": 0}, "epochs": 5},
    ],
    ids=["bce-sgd", "mse-adam", "no-validation"],
)
def test_each_loss_trains(stack, client, spec):
    job = client.post("/v1/jobs", json=spec).json()
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] in {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    last = job["latest_metrics"]
    if spec["data"].get("val_fraction") == 0:
        assert last["val_loss"] is None and last["val_accuracy"] is None
    elif spec["loss"] == "mse":
        assert last["val_loss"] is not None and last["val_accuracy"] is None
    else:
        assert 0.8 <= last["val_accuracy"] <= 1.0


def test_cancel_queued_and_running_jobs(stack, client):
    running = client.post("/v1/jobs", json=LONG).json()
    stack.wait_for_job(client, running["id"], lambda j: j["epochs_completed"] >= 1)
    # The only worker process is busy, so this one waits in the queue.
    queued = client.post("/v1/jobs", json=DIGITS).json()

    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"

    response = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    job = stack.wait_for_job(client, running["id"], lambda j: j["status"] != "running", timeout=30)
    assert job["status"] == "cancelled" and job["error"] is None
    assert job["epochs_completed"] < LONG["epochs"]

    # The freed worker receives the cancelled job's message and must not start it.
    wait_until(lambda: stack.queue_length() == 0, timeout=30, what="the queue to drain")
    follow_up = client.post("/v1/jobs", json={**DIGITS, "epochs": 1}).json()
    stack.wait_for_job(client, follow_up["id"], lambda j: j["status"] == "succeeded")
    never_started = client.get(f"/v1/jobs/{queued['id']}").json()
    assert never_started["status"] == "cancelled"
    assert never_started["attempt"] == 0 and never_started["started_at"] is None

    for job_id in (queued["id"], running["id"]):
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 409
        assert "already cancelled" in response.json()["error"]["message"]
        assert client.get(f"/v1/jobs/{job_id}/weights").status_code == 409


def test_divergence_fails_the_job_with_a_sentence(stack, client):
    spec = {
        "data": {"dataset": "regression"}, "loss": "mse", "epochs": 50,
        "optimizer": {"type": "sgd", "lr": 10.0, "momentum": 0.99},
    }
    job = client.post("/v1/jobs", json=spec).json()
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] in {"succeeded", "failed"})
    assert job["status"] == "failed"
    assert "at epoch" in job["error"] and "lower the learning rate" in job["error"]
    assert client.get(f"/v1/jobs/{job['id']}/weights").status_code == 409


def test_cli_submit_follow_show_download(stack, tmp_path):
    spec_file = tmp_path / "digits.yaml"
    spec_file.write_text(json.dumps({**DIGITS, "epochs": 4}))  # JSON is valid YAML
    env = {**stack.env, "KILN_URL": stack.url}

    def kiln(*args):
        return subprocess.run(
            [sys.executable, "-m", "kiln.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=120,
        )

    result = kiln("submit", str(spec_file), "--follow")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("submitted job ")
    job_id = lines[0].split()[2]
    assert [line.split()[1] for line in lines[1:5]] == ["1/4", "2/4", "3/4", "4/4"]
    assert "val_acc" in lines[1]
    assert lines[-1] == f"job {job_id} succeeded"

    shown = json.loads(kiln("show", job_id, "--json").stdout)
    assert shown["id"] == job_id and shown["status"] == "succeeded"

    out = tmp_path / "w.safetensors"
    result = kiln("download", job_id, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert load_weights(out)[1]["job_id"] == job_id

    failing = tmp_path / "bad.json"
    failing.write_text(json.dumps({"data": {"dataset": "regression"}, "epochs": 30, "optimizer": {"type": "sgd", "lr": 10, "momentum": 0.99}}))
    result = kiln("submit", str(failing), "--follow")
    assert result.returncode == 1 and " failed: loss became" in result.stdout

    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"data": {"dataset": "digits"}, "loss": "mse"}))
    result = kiln("submit", str(invalid))
    assert result.returncode == 1 and "body.loss" in result.stderr and "cross_entropy" in result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "show", job_id], env={**env, "KILN_API_KEY": "wrong"},
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: Unknown API key")
    unreachable = {**env, "KILN_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "show", job_id], env=unreachable, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "cannot reach the kiln API at http://127.0.0.1:9" in result.stderr


def test_duplicate_delivery_runs_a_job_once(stack, client):
    """Celery may deliver a message twice; the claim lets exactly one delivery train."""
    job = client.post("/v1/jobs", json={**DIGITS, "epochs": 3}).json()
    celery = make_celery(stack.settings)
    celery.send_task(TRAIN_TASK, args=[job["id"]], queue=stack.settings.queue)
    celery.close()
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")
    wait_until(lambda: stack.queue_length() == 0, timeout=30, what="the duplicate to be consumed")
    follow_up = client.post("/v1/jobs", json={**DIGITS, "epochs": 1}).json()
    stack.wait_for_job(client, follow_up["id"], lambda j: j["status"] == "succeeded")
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["attempt"] == 1
    assert [m["epoch"] for m in client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]] == [1, 2, 3]


def test_time_limit_fails_the_job_once_and_keeps_the_checkpoint(stack, client):
    job = client.post("/v1/jobs", json={**LONG, "time_limit_s": 3}).json()
    assert job["spec"]["time_limit_s"] == 3
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] != "queued" and j["status"] != "running", 60)
    assert job["status"] == "failed"
    done = job["epochs_completed"]
    kept = f"the epoch-{done} checkpoint is kept" if done else "no epoch had completed"
    assert job["error"] == f"time limit of 3 s exceeded during epoch {done + 1}; {kept}"
    kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}/history").json()["events"]]
    assert kinds == ["queued", "claimed", "failed"], "no requeue loop"


def test_time_limit_over_the_server_cap_is_refused(client):
    response = client.post("/v1/jobs", json={**DIGITS, "time_limit_s": 20 * 24 * 3600})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "body.time_limit_s"
    default = client.post("/v1/jobs", json={**DIGITS, "epochs": 1}).json()
    assert default["spec"]["time_limit_s"] == 24 * 3600, "the server default is filled in"


def test_model_zoo_through_the_service(stack, client, tmp_path):
    specs = {
        "cnn": {"data": {"dataset": "digits"}, "epochs": 2,
                "model": {"type": "cnn", "dims": 2, "channels": [8], "kernel_size": 3, "hidden": [32]}},
        "gru": {"data": {"dataset": "sine", "samples": 300}, "epochs": 2,
                "model": {"type": "rnn", "cell": "gru", "hidden_size": 16}},
        "early": {"data": {"dataset": "moons", "samples": 300}, "epochs": 200,
                  "optimizer": {"type": "adam", "lr": 0.05},
                  "early_stopping": {"patience": 3, "min_delta": 0.01, "restore_best": True}},
        "auto": {"data": {"dataset": "iris"}, "epochs": 3, "optimizer": {"type": "adamw", "lr": "auto"},
                 "scheduler": {"type": "cosine"}},
        "autoencoder": {"data": {"dataset": "wine"}, "epochs": 3, "loss": "mse",
                        "model": {"type": "autoencoder", "encoder": [8], "latent": 2}},
    }
    ids = {name: client.post("/v1/jobs", json=spec).json()["id"] for name, spec in specs.items()}
    jobs = {name: stack.wait_for_job(client, i, lambda j: j["status"] in {"succeeded", "failed"})
            for name, i in ids.items()}
    assert {name: j["status"] for name, j in jobs.items()} == dict.fromkeys(specs, "succeeded"), jobs

    last = jobs["cnn"]["latest_metrics"]
    assert last["grad_norm"] > 0 and set(last["grad_norm_per_layer"]) and last["train_accuracy"] is not None
    assert jobs["early"]["epochs_completed"] < 200
    assert jobs["early"]["stop_reason"].startswith("val_loss did not improve")
    history = client.get(f"/v1/jobs/{ids['early']}/history").json()["events"]
    assert "stopped early" in history[-1]["message"]
    search = jobs["auto"]["lr_search"]
    first_epoch = client.get(f"/v1/jobs/{ids['auto']}/metrics").json()["epochs"][0]
    assert first_epoch["lr"] == pytest.approx(search["lr"]), "training started at the chosen rate"
    assert len(search["sweep"]) > 5

    encoder = client.get(f"/v1/jobs/{ids['autoencoder']}/weights", params={"part": "encoder"})
    assert encoder.status_code == 200 and "encoder.safetensors" in encoder.headers["content-disposition"]
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(encoder.content)
    model, meta = load_weights(path)
    codes = predict(model, meta, np.random.default_rng(0).normal(size=(4, 13)).astype(np.float32))
    assert codes.shape == (4, 2)
    assert client.get(f"/v1/jobs/{ids['cnn']}/weights", params={"part": "encoder"}).status_code == 409


def test_predict_from_trained_weights(stack, client):
    job = client.post("/v1/jobs", json={**DIGITS, "epochs": 10}).json()
    premature = client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [[0.0] * 64]})
    assert premature.status_code == 409
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")

    spec = JobSpec.model_validate(job["spec"])
    x, y = load_dataset(spec.data, spec.seed)
    split = split_dataset(x, y, BUILTIN_DATASETS["digits"].task, spec.data.val_fraction, spec.seed)
    raw = (split.x_val[:50] * split.input_std + split.input_mean).tolist()  # raw rows, as a user has them
    response = client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": raw})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 50 and len(body["probabilities"][0]) == 10
    assert all(abs(sum(p) - 1) < 1e-4 for p in body["probabilities"])
    assert body["predictions"] == [int(np.argmax(p)) for p in body["probabilities"]]
    assert np.mean(np.array(body["predictions"]) == split.y_val[:50]) >= 0.9

    for bad, field in [({"inputs": [[1.0] * 3]}, "body.inputs"), ({"inputs": []}, "body.inputs"),
                       ({"inputs": [[1.0] * 64, [1.0]]}, "body.inputs"), ({"inputs": [[1.0] * 64] * 1025}, "body.inputs"),
                       ({"rows": [[1.0]]}, "body.rows")]:
        response = client.post(f"/v1/jobs/{job['id']}/predict", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert field in {d["field"] for d in response.json()["error"]["details"]}
    wrong_width = client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [[1.0] * 3]}).json()
    assert "expected inputs of shape" in wrong_width["error"]["message"]


def test_regression_predictions_are_in_target_units(stack, client):
    job = client.post("/v1/jobs", json={"data": {"dataset": "diabetes"}, "epochs": 30}).json()
    job = stack.wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded")
    x, y = load_dataset(JobSpec.model_validate(job["spec"]).data, 0)
    body = client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": x[:20].tolist()}).json()
    assert body["probabilities"] is None
    assert 25 < float(np.mean(body["predictions"])) < 350, "diabetes targets, not standardised values"
