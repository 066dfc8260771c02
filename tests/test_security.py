"""Security properties over the live stack (SECURITY.md): keys on every /v1 route, artifact paths that no request
can steer out of the store, symlinks planted in the store, and a broker that only ever carries JSON.

Each test drives the real processes (uvicorn, the Celery worker and predictor, the broker) as an attacker would:
raw HTTP request targets that no client library would normalise, raw messages pushed onto the broker's lists.
"""

import base64
import json
import os
import pickle
import secrets
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import kombu.exceptions
import numpy as np
import pytest
import redis

from kiln.client import TERMINAL
from kiln.dispatch import PREDICT_TASK, TRAIN_TASK, make_celery, predict_queue
from kiln.embedded import wait_until
from kiln.storage import DATASET, ENCODER, WEIGHTS, ArtifactStore

pytestmark = pytest.mark.e2e

PASSWD_LINE = b"root:x:0:0"


# --- helpers ----------------------------------------------------------------------------------------------


def train(stack, client, spec: dict) -> dict:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = stack.wait_for_job(client, response.json()["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    assert job["status"] == "succeeded", job
    return job


@dataclass
class RawResponse:
    status: int  # 0 when the server closed the connection without an answer
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


NO_HEADER = object()


def raw_request(stack, target: bytes, *, method: bytes = b"GET", authorization: bytes | None | object = None,
                body: bytes = b"", content_type: bytes = b"") -> RawResponse:
    """Sends the request byte for byte: no client library normalises `..`, decodes `%2e`, drops a `#` or refuses
    an odd header value. `authorization`: the raw header value, NO_HEADER for none, None for the stack's key."""
    url = httpx.URL(stack.url)
    if authorization is None:
        authorization = b"Bearer " + stack.api_key.encode()
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + url.host.encode(), b"Connection: close",
            b"Content-Length: " + str(len(body)).encode()]
    if authorization is not NO_HEADER:
        head.append(b"Authorization: " + authorization)
    if content_type:
        head.append(b"Content-Type: " + content_type)
    received = bytearray()
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    if not received:
        return RawResponse(0, {}, b"")
    head_bytes, _, payload = bytes(received).partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    return RawResponse(int(status_line.split()[1]), headers, payload)


def _unchunk(body: bytes) -> bytes:
    out, rest = bytearray(), body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2:]
    return bytes(out)


def store_of(stack) -> ArtifactStore:
    """The artifact store exactly as the API and the workers lay it out (kiln.storage decides where files go)."""
    return ArtifactStore(stack.settings.artifacts_path)


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Moves `path` (a file or a directory) aside for the duration, and puts it back afterwards whatever the
    test planted there meanwhile."""
    aside = path.with_name(path.name + f".aside-{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    try:
        yield aside
    finally:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        os.replace(aside, path)


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A file outside the artifact store, with content that must never leave the server."""
    outside = tmp_path_factory.mktemp("outside-the-store")
    path = outside / "secret.safetensors"
    path.write_bytes(b"KILN-SECRET-" + secrets.token_hex(16).encode())
    return path


@pytest.fixture(scope="module")
def autoencoder_job(stack) -> dict:
    """A succeeded job with both artifacts the API serves: the weights and, as an autoencoder, the encoder."""
    with stack.client() as client:
        return train(stack, client, {"data": {"dataset": "iris"}, "epochs": 1,
                                     "model": {"type": "autoencoder", "encoder": [8], "latent": 2}})


@pytest.fixture(scope="module")
def classifier_job(stack) -> dict:
    with stack.client() as client:
        return train(stack, client, {"data": {"dataset": "iris"}, "epochs": 1, "model": {"type": "mlp", "hidden": [8]}})


@pytest.fixture(scope="module")
def dataset(stack) -> dict:
    rng = np.random.default_rng(0)
    rows = "\n".join(f"{a:.4f},{b:.4f},{int(a > 0)}" for a, b in rng.normal(size=(40, 2)))
    with stack.client() as client:
        response = client.post("/v1/datasets", files={"file": ("d.csv", f"a,b,y\n{rows}\n".encode())},
                               data={"name": "security", "target": "y"})
    assert response.status_code == 201, response.text
    return response.json()


# --- 401 on every /v1 route -----------------------------------------------------------------------------


def v1_operations(stack) -> list[tuple[str, str]]:
    """Every /v1 (method, path) of the served OpenAPI document, with each path parameter a random UUID."""
    document = httpx.get(f"{stack.url}/openapi.json", timeout=30).json()
    operations = []
    for path, methods in document["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, operation in methods.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    path = path.replace("{" + parameter["name"] + "}", str(uuid.uuid4()))
            assert "{" not in path, f"a path parameter the document does not declare: {path}"
            operations.append((method.upper(), path))
    return operations


def bad_authorizations(key: str) -> dict[str, bytes | None]:
    """Authorization header values that must all be refused (None: no header at all)."""
    return {
        "missing": None,
        "empty": b"",
        "scheme only": b"Bearer",
        "scheme and a space": b"Bearer ",
        "basic": b"Basic Zm9vOmJhcg==",
        "basic carrying the key": b"Basic " + base64.b64encode(key.encode()),
        "another scheme carrying the key": b"Token " + key.encode(),
        "the key without a scheme": key.encode(),
        "5000 characters": b"Bearer " + b"k" * 5000,
        "non-ASCII (UTF-8)": "Bearer ключ-🔑".encode(),
        "non-ASCII (Latin-1)": b"Bearer \xe9\xe8\xff",
        "unknown key": b"Bearer kiln_" + secrets.token_urlsafe(32).encode(),
        "the key less its last character": b"Bearer " + key[:-1].encode(),
        "the key and one more character": b"Bearer " + key.encode() + b"x",
        "the key twice": b"Bearer " + key.encode() + b" " + key.encode(),
        "the key in another case": b"Bearer " + key.swapcase().encode(),
    }


def assert_unauthorized(response, what: str, presented: bytes | None) -> None:
    """response: an httpx.Response or a RawResponse."""
    assert response.status_code == 401 if isinstance(response, httpx.Response) else response.status == 401, (
        what, response.status_code if isinstance(response, httpx.Response) else response.status, response.json())
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, (what, body)
    assert body["error"]["code"] == "unauthorized", (what, body)
    assert body["error"]["message"].endswith("."), "messages are sentences"
    assert response.headers.get("www-authenticate") == "Bearer", (what, response.headers)
    if presented and len(presented) > 12:  # the refusal never echoes what was presented
        assert presented.split(b" ")[-1] not in json.dumps(body).encode(), what


def test_every_v1_operation_declares_the_bearer_scheme(stack):
    document = httpx.get(f"{stack.url}/openapi.json", timeout=30).json()
    schemes = document["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s == {**s, "type": "http", "scheme": "bearer"}], schemes
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            declared = bool(operation.get("security"))
            assert declared == path.startswith("/v1"), (method, path)
            if path.startswith("/v1"):
                assert "401" in operation["responses"], f"{method} {path} does not document its 401"


def test_every_v1_route_refuses_every_bad_authorization(stack):
    """A walk of the served document: each /v1 operation, each missing, malformed or wrong Authorization header
    (sent raw: several are values that HTTP client libraries refuse to send)."""
    operations = v1_operations(stack)
    assert len(operations) >= 11
    variants = bad_authorizations(stack.api_key)
    for method, path in operations:
        for what, value in variants.items():
            response = raw_request(stack, path.encode(), method=method.encode(),
                                   authorization=NO_HEADER if value is None else value)
            assert_unauthorized(response, f"{method} {path}: {what}", value)


def test_without_a_key_the_body_is_never_read(stack):
    """401 before anything about the body: an invalid JSON body, and a broken multipart upload, sent with no key."""
    for method, path in v1_operations(stack):
        if method != "POST":
            continue
        for content_type, body in ((b"application/json", b"{not json"), (b"multipart/form-data; boundary=x", b"--x\r\nbroken")):
            response = raw_request(stack, path.encode(), method=b"POST", authorization=NO_HEADER, body=body,
                                   content_type=content_type)
            assert_unauthorized(response, f"{method} {path}: no key, {content_type.decode()} body {body!r}", None)


def test_the_right_key_with_any_case_of_the_scheme_is_accepted(stack):
    """The control for the walk above: the scheme is case-insensitive (RFC 9110), the key is not."""
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for scheme in ("Bearer", "bearer", "BEARER"):
            response = client.get("/v1/jobs", params={"limit": 1},
                                  headers={"Authorization": f"{scheme} {stack.api_key}"})
            assert response.status_code == 200, (scheme, response.text)


def test_revoked_key_is_401_everywhere(stack):
    """A key that worked, once revoked (`kiln keys revoke <id>`), is refused on every /v1 route with a 401 of the
    same shape as any bad key (its message says the key was revoked), also on the job it created."""
    owner = f"revoked-{uuid.uuid4().hex[:8]}"
    key = stack.create_key(owner)
    with stack.client(api_key=key) as client:
        assert client.get("/v1/jobs").status_code == 200, "the new key works before it is revoked"
        job_id = client.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 1}).json()["id"]
    key_id = key.split("_")[1]  # kiln_<id>_<secret>
    revoked = stack.kiln("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    for method, path in v1_operations(stack) + [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel")]:
        response = raw_request(stack, path.encode(), method=method.encode(), authorization=b"Bearer " + key.encode())
        assert_unauthorized(response, f"{method} {path}: revoked key", key.encode())
        assert "revoked" in response.json()["error"]["message"]
    with stack.client(api_key=stack.create_key(owner)) as client:  # the cancel sent with the revoked key did nothing
        assert client.get(f"/v1/jobs/{job_id}").json()["cancel_requested"] is False


# --- another owner's resources: 404, byte for byte the 404 of a missing id --------------------------------


def test_another_owners_resources_are_a_404_identical_to_a_missing_id(stack):
    """Owner B asks for owner A's job and dataset by id on every route that takes one (walked from the served
    document, so events, logs or any later route is covered when it is served): each answer is the 404 that a
    random, never-issued id gets, byte for byte once the id itself is blanked, and nothing of A's changes.
    (Stack.create_key(owner) makes a new owner with a key, as `kiln keys create` does.)"""
    key_a, key_b = stack.create_key(f"owner-a-{uuid.uuid4().hex[:6]}"), stack.create_key(f"owner-b-{uuid.uuid4().hex[:6]}")
    with stack.client(api_key=key_a) as a, stack.client(api_key=key_b) as b:
        job = train(stack, a, {"data": {"dataset": "iris"}, "epochs": 1, "model": {"type": "mlp", "hidden": [8]}})
        upload = a.post("/v1/datasets", files={"file": ("d.csv", b"a,y\n" + b"".join(b"%d,%d\n" % (i, i % 2) for i in range(20)))},
                        data={"name": "theirs", "target": "y"})
        assert upload.status_code == 201, upload.text
        owned = {"job_id": job["id"], "dataset_id": upload.json()["id"]}
        bodies = {("POST", "/v1/jobs/{job_id}/predict"): {"inputs": [[5.1, 3.5, 1.4, 0.2]]}}

        document = b.get("/openapi.json").json()
        checked = set()
        for template, methods in document["paths"].items():
            names = [n for n in owned if "{" + n + "}" in template]
            if not template.startswith("/v1") or not names:
                continue
            for method in methods:
                method = method.upper()
                body = bodies.get((method, template))
                for params in ({}, {"part": "encoder"}) if template.endswith("/weights") else ({},):
                    missing = {n: str(uuid.uuid4()) for n in names}
                    theirs = b.request(method, _fill(template, owned), params=params, json=body)
                    never = b.request(method, _fill(template, missing), params=params, json=body)
                    assert theirs.status_code == never.status_code == 404, (method, template, theirs.text)
                    assert _blank(theirs.content, owned) == _blank(never.content, missing), (method, template)
                    assert theirs.headers.get("content-type") == never.headers.get("content-type")
                    checked.add((method, template))
        assert {("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/metrics"), ("GET", "/v1/jobs/{job_id}/history"),
                ("GET", "/v1/jobs/{job_id}/weights"), ("POST", "/v1/jobs/{job_id}/cancel"),
                ("POST", "/v1/jobs/{job_id}/predict"), ("GET", "/v1/datasets/{dataset_id}")} <= checked

        # Lists and submissions do not reveal them either, and B's attempts changed nothing of A's.
        assert job["id"] not in {j["id"] for j in b.get("/v1/jobs", params={"limit": 200}).json()["items"]}
        assert owned["dataset_id"] not in {d["id"] for d in b.get("/v1/datasets", params={"limit": 200}).json()["items"]}
        on_theirs = b.post("/v1/jobs", json={"data": {"dataset": owned["dataset_id"]}})
        on_missing = b.post("/v1/jobs", json={"data": {"dataset": (missing_id := str(uuid.uuid4()))}})
        assert on_theirs.status_code == on_missing.status_code == 422
        assert _blank(on_theirs.content, owned) == _blank(on_missing.content, {"dataset_id": missing_id})
        after = a.get(f"/v1/jobs/{job['id']}").json()
        assert (after["status"], after["cancel_requested"]) == ("succeeded", False)
        assert a.get(f"/v1/jobs/{job['id']}/weights").status_code == 200


def _fill(template: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        template = template.replace("{" + name + "}", value)
    return template


def _blank(content: bytes, ids: dict[str, str]) -> bytes:
    for value in ids.values():
        content = content.replace(value.encode(), b"<id>")
    return content


# --- artifact paths: traversal never leaves the store -------------------------------------------------------


def traversal_targets(job_id: str, dataset_id: str, secret: Path) -> dict[str, bytes]:
    """Request targets, raw, that try to reach a file outside the store through the artifact routes."""
    up = "../" * 12
    s = str(secret).lstrip("/")
    enc = quote(s, safe="")  # every / of the absolute path as %2F
    targets = {
        "dot-dot after the route": f"/v1/jobs/{job_id}/weights/{up}{s}",
        "dot-dot as the id": f"/v1/jobs/{up}{s}",
        "dot-dot after the id": f"/v1/jobs/{job_id}/{up}etc/passwd",
        "encoded dot-dot": f"/v1/jobs/{'%2e%2e%2f' * 12}{enc}/weights",
        "encoded dot-dot, upper case": f"/v1/jobs/{'%2E%2E%2F' * 12}{enc}/weights",
        "encoded slashes only": "/v1/jobs/..%2F..%2F..%2F..%2Fetc%2Fpasswd/weights",
        "double-encoded dot-dot": f"/v1/jobs/{'%252e%252e%252f' * 12}{quote(enc, safe='')}/weights",
        "triple-encoded dot-dot": f"/v1/jobs/{'%25252e%25252e%25252f' * 12}etc%25252fpasswd/weights",
        "overlong UTF-8 dot-dot": f"/v1/jobs/{'%c0%ae%c0%ae%c0%af' * 12}etc%c0%afpasswd/weights",
        "absolute path as the id, encoded": f"/v1/jobs/%2F{enc}/weights",
        "absolute path as the id": f"/v1/jobs//{s}/weights",
        "absolute path as the whole path": f"/{s}",
        "absolute-form request target": f"http://127.0.0.1/{s}",
        "semicolon after the id": f"/v1/jobs/{job_id};/{up}etc/passwd/weights",
        "encoded semicolon": f"/v1/jobs/{job_id}%3B..%2F..%2F..%2Fetc%2Fpasswd/weights",
        "semicolon after the route": f"/v1/jobs/{job_id}/weights;{up}etc/passwd",
        "fragment": f"/v1/jobs/{job_id}/weights#/{up}{s}",
        "encoded fragment": f"/v1/jobs/{job_id}%23/{up}{s}",
        "backslashes": f"/v1/jobs/{'..' + chr(92)}{'..' + chr(92)}etc{chr(92)}passwd/weights",
        "encoded backslashes": f"/v1/jobs/{'..%5c' * 12}{quote(s, safe='').replace('%2F', '%5c')}/weights",
        "over-long id": f"/v1/jobs/{'a' * 10_000}/weights",
        "very long id": f"/v1/jobs/{'../' * 20_000}etc/passwd/weights",
        "id in braces": f"/v1/jobs/{{{job_id}}}/weights",
        "id in upper case": f"/v1/jobs/{job_id.upper()}/weights",
        "part: dot-dot": f"/v1/jobs/{job_id}/weights?part={up}{s}",
        "part: encoded dot-dot": f"/v1/jobs/{job_id}/weights?part={'%2e%2e%2f' * 12}{enc}",
        "part: absolute path": f"/v1/jobs/{job_id}/weights?part=%2F{enc}",
        "part: a file name": f"/v1/jobs/{job_id}/weights?part={WEIGHTS}",
        "part: encoder and more": f"/v1/jobs/{job_id}/weights?part=encoder%2F..%2F..%2F{enc}",
        "part: repeated": f"/v1/jobs/{job_id}/weights?part=encoder&part={up}{s}",
        "part: semicolon": f"/v1/jobs/{job_id}/weights?part=encoder;{up}{s}",
        "dataset: dot-dot": f"/v1/datasets/{up}{s}",
        "dataset: encoded dot-dot": f"/v1/datasets/{'%2e%2e%2f' * 12}{enc}",
        "dataset: double-encoded": f"/v1/datasets/{'%252e%252e%252f' * 12}{quote(enc, safe='')}",
        "dataset: after the id": f"/v1/datasets/{dataset_id}/{up}{s}",
        "dataset: absolute path": f"/v1/datasets/%2F{enc}",
        "dataset: semicolon": f"/v1/datasets/{dataset_id};{up}{s}",
        "dataset: backslashes": f"/v1/datasets/{dataset_id}{chr(92)}..{chr(92)}..{chr(92)}{s}",
        # The dashboard's static files are the one other route that serves file content.
        "dashboard: dot-dot": f"/dashboard/{up}{s}",
        "dashboard: encoded dot-dot": f"/dashboard/{'%2e%2e%2f' * 12}{enc}",
        "dashboard: double-encoded": f"/dashboard/{'%252e%252e%252f' * 12}{quote(enc, safe='')}",
        "dashboard: a source file beside it": "/dashboard/..%2Froutes%2Fdashboard.py",
        "dashboard: absolute path": f"/dashboard/%2F{enc}",
        "dashboard: backslashes": f"/dashboard/..{chr(92)}..{chr(92)}..{chr(92)}etc{chr(92)}passwd",
        "dashboard: semicolon": "/dashboard/app.js;/../../../etc/passwd",
        "dashboard: NUL": "/dashboard/app.js%00.html",
    }
    return {what: target.encode() for what, target in targets.items()}


def test_traversal_never_serves_a_file_from_outside_the_store(stack, autoencoder_job, dataset, secret):
    """Every crafted target is refused with a 4xx (never a 500), and no answer carries the secret file, /etc/passwd
    or anything but the job's own artifact."""
    job_id = autoencoder_job["id"]
    with stack.client() as client:
        legit = {client.get(f"/v1/jobs/{job_id}/weights").content,
                 client.get(f"/v1/jobs/{job_id}/weights", params={"part": "encoder"}).content}
    assert all(legit)
    for what, target in traversal_targets(job_id, dataset["id"], secret).items():
        answer = raw_request(stack, target)
        status, body = answer.status, answer.body
        assert 0 < status < 500, (what, target[:200], status, body[:300])
        assert secret.read_bytes() not in body and PASSWD_LINE not in body, (what, target[:200])
        assert b"def asset(" not in body and b"import " not in body, (what, "a source file was served")
        if status == 200:  # nothing here names an artifact or a file that may be served
            assert body in legit, (what, target[:200], body[:200])


def test_a_nul_in_an_id_is_a_404_not_a_500(stack, autoencoder_job, dataset):
    job_id = autoencoder_job["id"]
    for target in (f"/v1/jobs/{job_id}%00/weights", f"/v1/jobs/%00{job_id}", f"/v1/jobs/{job_id}%00/metrics",
                   "/v1/jobs/..%00/weights", f"/v1/datasets/{dataset['id']}%00", "/v1/datasets/%00"):
        answer = raw_request(stack, target.encode())
        assert answer.status == 404, (target, answer.status, answer.body[:300])
    # A raw NUL byte in the request line is refused by the HTTP parser itself.
    assert raw_request(stack, f"/v1/jobs/{job_id}\x00/weights".encode()).status in (0, 400)


def test_a_nul_in_a_list_filter_is_a_422_not_a_500(stack):
    for target in ("/v1/jobs?name=a%00b", "/v1/jobs?name=%00"):
        answer = raw_request(stack, target.encode())
        assert answer.status == 422, (target, answer.status, answer.body[:300])
        assert answer.json()["error"]["details"][0]["field"] == "query.name"


def test_a_nul_in_a_cursor_is_a_422_not_a_500(stack):
    forged = json.dumps(["2026-01-01T00:00:00+00:00", "a\x00b"]).encode()
    cursor = base64.urlsafe_b64encode(forged).decode().rstrip("=")
    for path in ("/v1/jobs", "/v1/datasets"):
        answer = raw_request(stack, f"{path}?cursor={cursor}".encode())
        assert answer.status == 422, (path, answer.status, answer.body[:300])


# --- symlinks planted in the store -------------------------------------------------------------------------


def test_a_symlink_planted_in_the_store_is_never_followed(stack, autoencoder_job, classifier_job, secret):
    """Where a succeeded job's weights (or encoder) lie, an operator-side attacker with write access to the store
    plants symlinks: to a file outside the store, to another job's weights inside it, or in place of the job's
    whole directory. The API answers 404, never the file the link names."""
    store = store_of(stack)
    job_id, other = autoencoder_job["id"], classifier_job["id"]
    outside_dir = secret.parent / f"job-dir-{uuid.uuid4().hex[:6]}"
    outside_dir.mkdir()
    for name in (WEIGHTS, ENCODER):
        shutil.copyfile(secret, outside_dir / name)

    with stack.client() as client:
        def weights(part: str = "model") -> httpx.Response:
            return client.get(f"/v1/jobs/{job_id}/weights", params={"part": part})

        before = {part: weights(part).content for part in ("model", "encoder")}
        assert store.path(job_id, WEIGHTS).read_bytes() == before["model"], "the test plants where the API reads"

        plants = {
            "weights -> a file outside the store": (store.path(job_id, WEIGHTS), secret, "model"),
            "encoder -> a file outside the store": (store.path(job_id, ENCODER), secret, "encoder"),
            "weights -> another job's weights in the store": (store.path(job_id, WEIGHTS),
                                                               store.path(other, WEIGHTS), "model"),
            "the job's directory -> a directory outside": (store.job_dir(job_id), outside_dir, "model"),
            "the job's directory -> a directory outside (encoder)": (store.job_dir(job_id), outside_dir, "encoder"),
        }
        for what, (place, target, part) in plants.items():
            with replaced(place):
                os.symlink(target, place)
                response = weights(part)
                assert response.status_code == 404, (what, response.status_code, response.content[:200])
                assert response.json()["error"]["code"] == "not_found", what
                assert secret.read_bytes() not in response.content, what
            assert weights(part).content == before[part], f"{what}: the real file is served again once restored"


def test_a_symlinked_dataset_file_is_never_read_by_the_worker(stack, dataset, secret):
    """The worker opens an upload's file only as a regular file inside the store: a symlink in its place is
    refused even when what it points at is a byte-identical copy (so the sha256 check alone would pass)."""
    store = store_of(stack)
    place = store.dataset_path(dataset["id"])
    assert place.name == DATASET and place.is_file()
    copy = secret.parent / f"dataset-copy-{uuid.uuid4().hex[:6]}.safetensors"
    shutil.copyfile(place, copy)
    with stack.client() as client, replaced(place):
        os.symlink(copy, place)
        response = client.post("/v1/jobs", json={"data": {"dataset": dataset["id"]}, "epochs": 1})
        assert response.status_code == 201, response.text
        job = stack.wait_for_job(client, response.json()["id"], lambda j: j["status"] in TERMINAL, timeout=180)
    assert job["status"] == "failed", job
    assert job["epochs_completed"] == 0
    # The runner's sentence for this is in the worker's log (the job's error says only "unexpected RuntimeError").
    log = (stack.logs / "worker.log").read_text(errors="replace")
    assert f"the file of dataset {dataset['id']} is missing from the artifact store" in log


def test_what_the_store_checked_is_what_is_read(tmp_path):
    """Time of check to time of use: between open_artifact's checks and the read, the job's directory is swapped
    for a symlink to a directory outside the store. Whatever open_artifact returns must still read the file it
    checked (an open file does; a path does not)."""
    store = ArtifactStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    store.job_dir(job_id).mkdir(parents=True)
    store.path(job_id, WEIGHTS).write_bytes(b"the real weights")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / WEIGHTS).write_bytes(b"KILN-SECRET")

    checked = store.open_artifact(job_id, WEIGHTS)
    assert checked is not None
    os.replace(store.job_dir(job_id), tmp_path / "moved-away")  # the attacker's swap, after the check
    os.symlink(outside, store.job_dir(job_id))
    assert _read(checked) == b"the real weights"


def _read(handle) -> bytes:
    if isinstance(handle, int):
        with os.fdopen(handle, "rb") as f:
            return f.read()
    if isinstance(handle, Path | str):
        return Path(handle).read_bytes()
    return handle.read()


# --- broker hygiene: JSON only -----------------------------------------------------------------------------


class Armed:
    """Unpickling this creates the marker file: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def pickled_task_message(task: str, queue: str, marker: Path) -> tuple[str, bytes]:
    """A Celery (protocol 2) task message whose body is a pickle, as kombu's Redis transport stores it in the
    queue's list: a JSON envelope, the body base64-encoded, content type application/x-python-serialize."""
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((Armed(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None, "group": None,
            "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": "(Armed(),)", "kwargsrepr": "{}", "origin": "attacker@nowhere", "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return task_id, json.dumps(envelope).encode()


def test_the_payload_is_armed(tmp_path):
    """The control for the tests below: unpickling the body of such a message does create the marker."""
    control = tmp_path / "control"
    _, message = pickled_task_message(TRAIN_TASK, "q", control)
    pickle.loads(base64.b64decode(json.loads(message)["body"]))
    assert control.exists()


def _held_by_broker(client: redis.Redis, queue: str, task_id: str) -> bool:
    held = client.lrange(queue, 0, -1) + client.hvals("unacked")
    return any(task_id.encode() in message for message in held)


@pytest.mark.parametrize("role", ["train", "predict"])
def test_a_pickled_message_is_refused_unexecuted(stack, tmp_path, classifier_job, role):
    """A pickle-serialised task pushed raw onto the worker's (or the predictor's) queue: the consumer refuses its
    content type without unpickling it, drops it, and goes on serving."""
    settings = stack.settings
    task, queue, log = {
        "train": (TRAIN_TASK, settings.queue, stack.logs / "worker.log"),
        "predict": (PREDICT_TASK, predict_queue(settings), stack.logs / "predictor.log"),
    }[role]
    marker = tmp_path / f"pickle-ran-{uuid.uuid4().hex}"
    task_id, message = pickled_task_message(task, queue, marker)

    with redis.Redis.from_url(settings.broker_url) as client:
        client.lpush(queue, message)

        def refused() -> bool:
            text = log.read_text(errors="replace")
            # The consumer logs the refusal and the message's raw bytes, which name the marker file.
            return ("Refusing to deserialize untrusted content of type pickle" in text and marker.name in text
                    and not _held_by_broker(client, queue, task_id))

        wait_until(refused, timeout=120, interval=0.1, what=f"the {role} consumer to refuse the pickled message")
    assert not marker.exists(), "a pickle from the broker was executed"
    assert stack.processes["worker" if role == "train" else "predictor"].poll() is None

    with stack.client() as client:  # still serving
        if role == "train":
            train(stack, client, {"data": {"dataset": "iris"}, "epochs": 1, "model": {"type": "mlp", "hidden": [4]}})
        else:
            response = client.post(f"/v1/jobs/{classifier_job['id']}/predict", json={"inputs": [[5.1, 3.5, 1.4, 0.2]]})
            assert response.status_code == 200, response.text
    assert not marker.exists()


def test_the_producer_side_never_unpickles_a_planted_result(stack, tmp_path):
    """The API reads prediction replies from the result backend; a reply planted there as a pickle is refused
    (the backend decodes with its own JSON serializer, whatever the stored bytes claim to be)."""
    marker = tmp_path / "result-pickle-ran"
    app = make_celery(stack.settings)  # configured as the API's producer is
    task_id = str(uuid.uuid4())
    payload = pickle.dumps({"status": "SUCCESS", "result": Armed(marker), "traceback": None, "children": [],
                            "task_id": task_id, "date_done": None})
    try:
        with redis.Redis.from_url(stack.settings.broker_url) as client:
            client.set(f"celery-task-meta-{task_id}", payload, ex=60)
        with pytest.raises(kombu.exceptions.DecodeError):  # refused as not JSON; not a timeout, never unpickled
            app.AsyncResult(task_id).get(timeout=5)
    finally:
        app.close()
    assert not marker.exists(), "a pickled result was executed"
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]

