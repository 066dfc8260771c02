"""The HTTP contract, over real HTTP against a real API server process (see API.md)."""

import base64
import json
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT

DIGITS = {"data": {"dataset": "digits"}, "epochs": 1}


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"].endswith("."), "messages are sentences"
    return body["error"]


def test_health_needs_no_key(stack):
    with stack.client(api_key="") as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": True, "broker": True}


@pytest.mark.parametrize("key", ["", "not-the-key"])
def test_every_v1_route_demands_the_key(stack, key):
    paths = stack.client().get("/openapi.json").json()["paths"]
    v1 = [(method, path) for path, ops in paths.items() if path.startswith("/v1") for method in ops]
    assert len(v1) >= 6
    with stack.client(api_key=key) as anonymous:
        for method, path in v1:
            response = anonymous.request(method, path.replace("{job_id}", str(uuid.uuid4())))
            err = assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", (method, path)
            assert "key" in err["message"].lower()


def test_malformed_authorization_header_is_401(stack):
    with stack.client(api_key="") as anonymous:
        response = anonymous.get("/v1/jobs", headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert_error(response, 401, "unauthorized")


def test_every_bad_field_is_named(client):
    bad = {
        "name": "",
        "model": {"type": "mlp", "hidden": [1_000_000_000], "activation": "swish", "dropout": 2},
        "data": {"dataset": "digits", "val_fraction": 0.9},
        "optimizer": {"type": "sgd", "lr": -1, "momentum": 1.5},
        "epochs": 0,
        "batch_size": 0,
        "seed": -1,
        "surprise": True,
    }
    newest_before = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
    err = assert_error(client.post("/v1/jobs", json=bad), 422, "validation_error")
    fields = {d["field"] for d in err["details"]}
    expected = {
        "body.name", "body.model.hidden.0", "body.model.activation", "body.model.dropout",
        "body.data.val_fraction", "body.optimizer.lr", "body.optimizer.momentum", "body.epochs",
        "body.batch_size", "body.seed", "body.surprise",
    }
    assert expected <= fields, expected - fields
    for field in ("body.epochs", "body.surprise"):
        assert field in err["message"]
    assert client.get("/v1/jobs", params={"limit": 1}).json()["items"] == newest_before, "nothing was queued"


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ({"data": {"dataset": "digits"}, "loss": "mse"}, "body.loss", "'cross_entropy'"),
        ({"data": {"dataset": "diabetes"}, "loss": "cross_entropy"}, "body.loss", "'mse'"),
        ({"data": {"dataset": "mnist"}}, "body.data.dataset", "digits"),
        ({"data": {"dataset": "digits"}, "optimizer": {"type": "adam", "lr": "NaN"}}, "body.optimizer.lr", "finite"),
        ({"data": {"dataset": "digits"}, "epochs": 10**12}, "body.epochs", "less than"),
        ({"data": {"dataset": "digits"}, "optimizer": {"type": "adam", "momentum": 0.9}}, "body.optimizer.momentum", "not permitted"),
        ({"data": {"dataset": "digits", "samples": 500}}, "body.data.samples", "generated"),
        ({"model": {"type": "transformer"}, "data": {"dataset": "digits"}}, "body.model", "mlp"),
        ({}, "body.data", "required"),
    ],
)
def test_single_bad_field(client, spec, field, words):
    err = assert_error(client.post("/v1/jobs", json=spec), 422, "validation_error")
    messages = {d["field"]: d["message"] for d in err["details"]}
    assert field in messages, messages
    assert words in messages[field]


def test_loss_that_does_not_fit_says_which_do(client):
    err = assert_error(client.post("/v1/jobs", json={"data": {"dataset": "digits"}, "loss": "mse"}), 422, "validation_error")
    assert err["details"][0]["message"] == (
        "loss 'mse' does not fit dataset 'digits', a classification task; use 'cross_entropy'"
    )


def test_body_that_is_not_json(client):
    response = client.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_error(response, 422, "validation_error")


def test_body_too_large(client):
    response = client.post("/v1/jobs", content=b" " * (2 << 20), headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


def test_unknown_job_is_404_everywhere(client):
    missing = str(uuid.uuid4())
    for method, path in [
        ("GET", f"/v1/jobs/{missing}"), ("GET", f"/v1/jobs/{missing}/metrics"),
        ("GET", f"/v1/jobs/{missing}/weights"), ("POST", f"/v1/jobs/{missing}/cancel"),
        ("GET", "/v1/jobs/../../etc/passwd"), ("GET", "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd/weights"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_defaults_are_filled_in_and_normalised(client):
    response = client.post("/v1/jobs", json={"data": {"dataset": "breast_cancer"}, "epochs": 1})
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["spec"]["loss"] == "bce"
    assert job["spec"]["optimizer"] == {"type": "adam", "lr": 0.001, "weight_decay": 0.0}
    assert job["spec"]["model"]["hidden"] == [64]
    assert job["created_at"].endswith(("Z", "+00:00"))
    assert job["attempt"] == 0 and job["worker"] is None and job["error"] is None


def test_idempotency_key_returns_the_first_job(client):
    key = f"retry-{uuid.uuid4()}"
    first = client.post("/v1/jobs", json=DIGITS, headers={"Idempotency-Key": key})
    again = client.post("/v1/jobs", json=DIGITS, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]


def test_list_filters_and_pages(client):
    name = f"page-{uuid.uuid4().hex[:8]}"
    ids = [client.post("/v1/jobs", json={**DIGITS, "name": name}).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"name": name, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        seen += [job["id"] for job in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == ids[::-1], "newest first, each job exactly once"
    statuses = client.get("/v1/jobs", params={"name": name, "status": ["failed", "cancelled"]}).json()
    assert all(job["status"] in {"failed", "cancelled"} for job in statuses["items"])
    assert_error(client.get("/v1/jobs", params={"status": "exploded"}), 422, "validation_error")
    assert_error(client.get("/v1/jobs", params={"cursor": "garbage!"}), 422, "validation_error")
    naive = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00", ids[0]]).encode()).decode()
    assert_error(client.get("/v1/jobs", params={"cursor": naive}), 422, "validation_error")
    assert_error(client.get("/v1/jobs", params={"limit": 0}), 422, "validation_error")


def test_api_does_not_import_torch():
    code = (
        "import sys, os; os.environ.setdefault('KILN_API_KEY', 'x'); os.environ.setdefault('KILN_BROKER_URL', 'redis://127.0.0.1:1/0');"
        "from api.app import create_app; create_app();"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'worker', 'models', 'sklearn'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
