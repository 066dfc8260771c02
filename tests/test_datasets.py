"""Dataset uploads over real HTTP: parsing and its refusals, storage, listing, and training on an upload."""

import io
import pickle
import uuid
import zipfile
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy.orm import Session

from kiln.client import TERMINAL
from kiln.db import make_engine, utcnow
from kiln.tables import Dataset, Job, JobStatus
from tests.conftest import second_api
from tests.test_api import assert_error

pytestmark = pytest.mark.e2e

SMALL_LIMIT = 64 * 1024  # KILN_MAX_UPLOAD_BYTES of the second API server below
DATASET_KEYS = {"id", "name", "task", "rows", "features", "classes", "labels", "created_at"}


def csv_bytes(header: str, rows: list[list[object]]) -> bytes:
    return (header + "\n" + "\n".join(",".join(map(str, row)) for row in rows) + "\n").encode()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload(client, content: bytes, filename: str = "data.csv", **form):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data={"name": "upload", **form})


def three_classes(rows: int = 90) -> bytes:
    """Two features; the class (labels 5, 6, 7) is the band the first feature falls in."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 3, rows)
    return csv_bytes("a,b,species", [[f"{v:.4f}", f"{w:.4f}", 5 + int(v)] for v, w in zip(a, rng.normal(size=rows), strict=True)])


@pytest.fixture(scope="module")
def small_uploads(stack):
    """A second API server on the same database, broker and artifacts, with a small upload limit."""
    with second_api(stack, "api-small-uploads", KILN_MAX_UPLOAD_BYTES=str(SMALL_LIMIT)) as small, small.client() as c:
        yield c


@pytest.fixture(scope="module")
def database(stack):
    engine = make_engine(stack.settings.database_url)
    yield engine
    engine.dispose()


# --- uploads that work ------------------------------------------------------------------------------------


def test_csv_upload_detects_the_task_and_remaps_labels(client):
    response = upload(client, three_classes(), name="iris-like", target="species")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert set(dataset) == DATASET_KEYS
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    assert dataset["name"] == "iris-like" and dataset["task"] == "classification"
    assert (dataset["rows"], dataset["features"], dataset["classes"]) == (90, 2, 3)
    assert dataset["labels"] == [5, 6, 7], "class i is the i-th original label"
    assert dataset["created_at"].endswith(("Z", "+00:00"))
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset


@pytest.mark.parametrize(
    "targets, task, classes",
    [
        ([3, 8] * 10, "binary", 2),
        ([0, 1, 2, 3] * 5, "classification", 4),
        ([i % 51 for i in range(102)], "regression", None),  # more than 50 distinct integers
        ([i / 4 for i in range(20)], "regression", None),
    ],
)
def test_auto_task(client, targets, task, classes):
    content = csv_bytes("f,t", [[i, t] for i, t in enumerate(targets)])
    dataset = upload(client, content, target="t", task="auto").json()
    assert (dataset["task"], dataset["classes"]) == (task, classes)
    assert dataset["labels"] == (sorted(set(targets)) if classes else None)


def test_npz_upload_and_an_explicit_task(client):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    content = npz_bytes(x=x, y=(x[:, 0] > 0).astype(np.int32) * 2)
    dataset = upload(client, content, filename="arrays.npz", task="classification").json()
    assert (dataset["task"], dataset["rows"], dataset["features"], dataset["classes"]) == ("classification", 40, 3, 2)
    assert dataset["labels"] == [0, 2]


def test_an_upload_may_exceed_the_json_body_limit(client):
    """Uploads have their own limit (KILN_MAX_UPLOAD_BYTES), not the 1 MiB of JSON bodies."""
    rows = [[f"{i * 0.001:.6f}", f"{i * 0.002:.6f}", f"{i * 0.003:.6f}", i % 2] for i in range(40_000)]
    content = csv_bytes("a,b,c,label", rows)
    assert len(content) > 1 << 20
    dataset = upload(client, content, target="label").json()
    assert (dataset["rows"], dataset["task"]) == (40_000, "binary")


def test_list_and_get(client):
    ids = [upload(client, three_classes(), name=f"listed-{i}", target="species").json()["id"] for i in range(3)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/datasets", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert set(page) == {"items", "next_cursor"}
        assert all(set(item) == DATASET_KEYS for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert [i for i in seen if i in ids] == ids[::-1], "newest first, each dataset exactly once"
    assert_error(client.get("/v1/datasets", params={"cursor": "garbage!"}), 422, "validation_error")
    for missing in (str(uuid.uuid4()), "not-an-id"):
        assert_error(client.get(f"/v1/datasets/{missing}"), 404, "not_found")


# --- training on uploads ---------------------------------------------------------------------------------


def train(stack, client, spec: dict) -> dict:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return stack.wait_for_job(client, response.json()["id"], lambda j: j["status"] in TERMINAL)


def test_train_on_a_csv_upload(stack, client):
    dataset = upload(client, three_classes(), target="species").json()
    job = train(stack, client, {"data": {"dataset": dataset["id"]}, "model": {"type": "mlp", "hidden": [16]},
                                "epochs": 3, "batch_size": 16})
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["loss"] == "cross_entropy", "the default loss comes from the upload's task"
    assert job["epochs_completed"] == 3
    assert client.get(f"/v1/jobs/{job['id']}/weights").status_code == 200


def test_train_on_an_npz_upload(stack, client):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    dataset = upload(client, npz_bytes(x=x, y=x @ np.array([1.0, -2.0, 0.5, 0.0])), filename="r.npz").json()
    assert dataset["task"] == "regression"
    job = train(stack, client, {"data": {"dataset": dataset["id"], "val_fraction": 0.25}, "loss": "huber",
                                "epochs": 2, "batch_size": 8})
    assert job["status"] == "succeeded", job["error"]
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
    assert len(metrics) == 2 and metrics[-1]["val_r2"] is not None


def test_a_spec_is_checked_against_the_upload(client):
    dataset = upload(client, three_classes(), target="species").json()
    err = assert_error(client.post("/v1/jobs", json={"data": {"dataset": dataset["id"]}, "loss": "mse"}),
                       422, "validation_error")
    assert err["details"][0]["field"] == "body.loss"
    assert f"does not fit dataset '{dataset['id']}', a classification task" in err["details"][0]["message"]
    err = assert_error(client.post("/v1/jobs", json={"data": {"dataset": dataset["id"]}, "model": {"type": "rnn"}}),
                       422, "validation_error")
    assert [d["field"] for d in err["details"]] == ["body.model"]


def test_an_unknown_dataset_id_is_refused(client):
    missing = str(uuid.uuid4())
    err = assert_error(client.post("/v1/jobs", json={"data": {"dataset": missing}}), 422, "validation_error")
    assert [d["field"] for d in err["details"]] == ["body.data.dataset"]
    assert f"unknown dataset '{missing}'" in err["details"][0]["message"]
    assert "body.data.dataset" in err["message"]


def test_another_owners_dataset_is_invisible(client, database):
    theirs = str(uuid.uuid4())
    with Session(database) as session:
        session.add(Dataset(id=theirs, owner="someone-else", name="theirs", task="binary", rows=20, features=2,
                            classes=2, labels=[0, 1], input_shape=[2], created_at=utcnow(), sha256="0" * 64))
        session.commit()
    assert_error(client.get(f"/v1/datasets/{theirs}"), 404, "not_found")
    assert theirs not in {d["id"] for d in client.get("/v1/datasets", params={"limit": 200}).json()["items"]}
    err = assert_error(client.post("/v1/jobs", json={"data": {"dataset": theirs}}), 422, "validation_error")
    assert [d["field"] for d in err["details"]] == ["body.data.dataset"]


def test_the_worker_fails_a_job_whose_dataset_is_gone(stack, client, database):
    """The claim validates the stored spec against the upload again; without it the job fails with a sentence."""
    dataset = upload(client, three_classes(), target="species").json()
    spec = client.post("/v1/jobs", json={"data": {"dataset": dataset["id"]}, "epochs": 1}).json()["spec"]
    job_id = str(uuid.uuid4())
    with Session(database) as session:  # queued but never published: the reconciler's outbox publishes it
        session.add(Job(id=job_id, owner="default", status=JobStatus.queued, queue=stack.settings.queue,
                        spec={**spec, "data": {**spec["data"], "dataset": str(uuid.uuid4())}},
                        created_at=utcnow() - timedelta(seconds=30), epochs_completed=0, checkpoint_epoch=0,
                        attempt=0, cancel_requested=False))
        session.commit()
    job = stack.wait_for_job(client, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "failed"
    assert job["error"].startswith("the spec no longer validates: unknown dataset"), job["error"]


# --- refusals --------------------------------------------------------------------------------------------

ROWS = [[i, i * 2, i % 2] for i in range(12)]


@pytest.mark.parametrize(
    "content, target, field, words",
    [
        (b"", "y", "body.file", ["empty"]),
        (b"\n\n", "y", "body.file", ["no rows"]),
        (csv_bytes("1,2,3", ROWS), "y", "body.file", ["line 1", "header row"]),
        (csv_bytes("a,b,y", ROWS[:5] + [[1, 2]] + ROWS[5:]), "y", "body.file", ["line 7 has 2 values", "3 columns"]),
        (csv_bytes("a,b,y", ROWS[:3] + [[1, "abc", 0]] + ROWS[3:]), "y", "body.file",
         ["line 5, column 'b'", "'abc'", "not a number"]),
        (csv_bytes("a,b,y", ROWS[:3] + [[1, "", 0]] + ROWS[3:]), "y", "body.file", ["line 5, column 'b' is empty"]),
        (csv_bytes("a,b,y", ROWS[:2] + [["inf", 1, 0]] + ROWS[2:]), "y", "body.file", ["line 4, column 'a' is inf"]),
        (csv_bytes("a,b,y", ROWS), "price", "body.target", ["no column named 'price'", "a, b, y"]),
        (csv_bytes("a,b,y", ROWS), None, "body.target", ["needs target", "a, b, y"]),
        (csv_bytes("a,b,y", ROWS[:9]), "y", "body.file", ["9 rows", "at least 10"]),
        (csv_bytes(",".join(f"c{i}" for i in range(10_001)) + ",y", []), "y", "body.file", ["10002 columns", "10000"]),
        (csv_bytes("a,a,y", ROWS), "y", "body.file", ["'a' appears twice"]),
        (csv_bytes("y", [[i % 2] for i in range(12)]), "y", "body.file", ["feature column"]),
        (csv_bytes("a,b,y", [[i, i, 1] for i in range(12)]), "y", "body.file", ["every target is 1.0"]),
    ],
    ids=["empty", "blank", "no-header", "ragged", "non-numeric", "empty-cell", "infinite", "no-target-column",
         "target-not-given", "few-rows", "too-many-columns", "duplicate-column", "target-only", "constant-target"],
)
def test_malformed_csv_is_refused_with_where(client, content, target, field, words):
    form = {"target": target} if target else {}
    err = assert_error(upload(client, content, **form), 422, "validation_error")
    assert [d["field"] for d in err["details"]] == [field]
    for word in words:
        assert word in err["message"], (word, err["message"])


def test_a_task_the_targets_cannot_have_is_refused(client):
    floats = csv_bytes("a,y", [[i, i / 3] for i in range(12)])
    err = assert_error(upload(client, floats, target="y", task="classification"), 422, "validation_error")
    assert "integer class labels" in err["message"] and "line 3, column 'y'" in err["message"]
    three = csv_bytes("a,y", [[i, i % 3] for i in range(12)])
    err = assert_error(upload(client, three, target="y", task="binary"), 422, "validation_error")
    assert "exactly 2 distinct labels" in err["message"]
    assert_error(upload(client, three, target="y", task="clustering"), 422, "validation_error")


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"x": np.ones((12, 2)), "z": np.ones(12)}, ["no array y", "x, z"]),
        ({"x": np.ones((12, 2, 2)), "y": np.ones(12)}, ["x has shape (12, 2, 2)", "2-D"]),
        ({"x": np.ones((12, 2)), "y": np.ones((12, 1))}, ["y has shape (12, 1)", "1-D"]),
        ({"x": np.ones((12, 2)), "y": np.ones(11)}, ["12 rows but y has 11"]),
        ({"x": np.full((12, 2), np.nan), "y": np.arange(12)}, ["x[0, 0] is nan"]),
        ({"x": np.array([["a", "b"]] * 12), "y": np.arange(12)}, ["<U1"]),
    ],
    ids=["no-y", "x-3d", "y-2d", "lengths", "nan", "strings"],
)
def test_malformed_npz_is_refused(client, arrays, words):
    err = assert_error(upload(client, npz_bytes(**arrays), filename="bad.npz"), 422, "validation_error")
    for word in words:
        assert word in err["message"], (word, err["message"])


class Plant:
    """Unpickling this creates a file: the proof that a payload ran."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "x")


def npz_with_objects(marker) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([[Plant(marker)]] * 12, dtype=object), y=np.arange(12), allow_pickle=True)
    return buffer.getvalue()


def test_a_pickle_is_never_executed(client, tmp_path):
    control = tmp_path / "control"
    with np.load(io.BytesIO(npz_with_objects(control)), allow_pickle=True) as archive:
        for opened in archive["x"].ravel():  # the payload is live: loading it with pickles allowed runs it
            opened.close()
    assert control.exists()

    marker = tmp_path / "marker"
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:  # a pickle stored under a .npy name
        archive.writestr("x.npy", pickle.dumps(Plant(marker)))
        archive.writestr("y.npy", pickle.dumps(Plant(marker)))
    for content, words in [
        (npz_with_objects(marker), "holds Python objects (a pickle)"),
        (zipped.getvalue(), "not a .npy array"),
        (pickle.dumps(Plant(marker)), "neither an NPZ archive nor UTF-8 text"),
    ]:
        err = assert_error(upload(client, content, filename="data.npz"), 422, "validation_error")
        assert words in err["message"]
    assert not marker.exists(), "the server ran a pickle"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "neither an NPZ archive nor UTF-8 text"),
        (b"\x93NUMPY\x01\x00" + bytes(100), "neither an NPZ archive nor UTF-8 text"),
        (b"PK\x03\x04 truncated", "looks like an NPZ archive but cannot be read"),
        (b"a,b\x00,y\n", "neither an NPZ archive nor UTF-8 text"),
        (csv_bytes("a,y", ROWS).decode().encode("utf-16"), "neither an NPZ archive nor UTF-8 text"),
        (csv_bytes("a,y", [[0, 1]] * 11 + [[b"\xff".decode("latin-1"), 1]]).decode().encode("latin-1"),
         "UTF-8 text (invalid start byte); save a CSV file as UTF-8"),
        (b"a,b,y\n1," + b"9" * 200_000 + b",0\n", "line 2 is not valid CSV (field larger than field limit"),
    ],
    ids=["png", "npy", "broken-zip", "nul", "utf-16", "latin-1", "huge-cell"],
)
def test_other_formats_are_refused(client, content, words):
    err = assert_error(upload(client, content, filename="data.bin", target="y"), 422, "validation_error")
    assert words in err["message"]
    assert err["details"][0]["field"] in ("body.file", "body.target")


def test_oversized_upload_is_413(small_uploads):
    big = csv_bytes("a,b,y", [[i, i, i % 2] for i in range(100_000)])
    assert len(big) > 16 * SMALL_LIMIT
    err = assert_error(upload(small_uploads, big, target="y"), 413, "payload_too_large")
    assert str(SMALL_LIMIT) in err["message"]
    # A small upload still works on that server.
    assert upload(small_uploads, three_classes(), target="species").status_code == 201


def test_oversized_chunked_upload_is_413(small_uploads):
    """No Content-Length: refused once the bytes received pass the limit."""
    boundary = "kiln-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"target\"\r\n\r\ny\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n\r\n").encode()

    def chunks():
        yield head + b"a,b,y\n"
        for i in range(200):
            yield b"".join(b"%d,%d,%d\n" % (i, j, j % 2) for j in range(500))
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small_uploads.post("/v1/datasets", content=chunks(),
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_npz_that_unpacks_past_the_limit_is_413(small_uploads):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1000, 100)), y=np.zeros(1000))
    assert len(buffer.getvalue()) < SMALL_LIMIT
    err = assert_error(upload(small_uploads, buffer.getvalue(), filename="bomb.npz"), 413, "payload_too_large")
    assert "uncompressed" in err["message"]
