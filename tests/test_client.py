"""The Python SDK, kiln.Client: against the real stack, and (for what a real server does rarely on demand, such as
dropping a stream halfway) against httpx's MockTransport."""

import hashlib
import inspect
import json
import sys
import time
import types
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

import kiln
from kiln.client import (
    Client,
    EndEvent,
    EpochEvent,
    KilnError,
    StatusEvent,
    job_eta,
    job_progress,
)
from kiln.spec import JobSpec

pytestmark = pytest.mark.e2e

LONG = {"name": "sdk-long", "data": {"dataset": "regression", "samples": 20000}, "epochs": 10_000, "batch_size": 8}


@pytest.fixture
def sdk(stack):
    with Client(stack.url, api_key=stack.api_key) as client:
        yield client


@pytest.fixture(scope="module")
def iris_job(stack) -> dict:
    """A succeeded iris job (6 epochs), submitted as a typed JobSpec."""
    with Client(stack.url, api_key=stack.api_key) as client:
        spec = JobSpec.model_validate({"name": "sdk-iris", "data": {"dataset": "iris"}, "epochs": 6})
        job = client.submit(spec)
        assert job["status"] == "queued" and job["spec"]["loss"] == "cross_entropy"
        job = client.wait(job["id"], timeout=180, poll=0.1)
        assert job["status"] == "succeeded", job
        return job


def test_client_is_importable_from_kiln():
    assert kiln.Client is Client and kiln.KilnError is KilnError


def test_the_sdk_types_name_every_field_the_api_sends():
    """kiln.client's TypedDicts mirror the API's models by hand (the SDK does not import the API); this keeps them
    from drifting apart."""
    from api.schemas import EpochMetrics as EpochMetricsOut
    from api.schemas import JobOut
    from kiln.client import EpochMetrics, Job

    assert set(Job.__annotations__) == set(JobOut.model_fields)
    assert set(EpochMetrics.__annotations__) == set(EpochMetricsOut.model_fields)


def test_every_public_method_has_an_example():
    for owner in (Client, kiln.client.Datasets):
        for name, member in inspect.getmembers(owner, inspect.isfunction):
            if not name.startswith("_"):
                assert ">>>" in (member.__doc__ or ""), f"{owner.__name__}.{name} has no example"


def test_wait_returns_the_final_job(sdk, iris_job):
    again = sdk.wait(iris_job["id"], timeout=5)
    assert again["status"] == "succeeded" and again["epochs_completed"] == 6
    assert job_progress(again) == 1.0 and job_eta(again) is None


def test_wait_raises_a_clear_timeout_error(sdk):
    job = sdk.submit(LONG)
    try:
        with pytest.raises(TimeoutError, match=rf"job {job['id']} is still (queued|running) .*after 0.5 s"):
            sdk.wait(job["id"], timeout=0.5, poll=0.1)
    finally:
        sdk.cancel(job["id"])
    assert sdk.wait(job["id"], timeout=120, poll=0.1)["status"] == "cancelled"


def test_stream_yields_epochs_in_order_then_the_end(sdk):
    job = sdk.submit({"name": "sdk-stream", "data": {"dataset": "iris"}, "epochs": 8})
    events = list(sdk.stream(job["id"]))
    assert isinstance(events[0], StatusEvent) and events[0].job["id"] == job["id"]
    assert [e.metrics["epoch"] for e in events if isinstance(e, EpochEvent)] == list(range(1, 9))
    assert isinstance(events[-1], EndEvent) and events[-1].job["status"] == "succeeded"
    assert not any(isinstance(e, EndEvent) for e in events[:-1])
    assert all(e.metrics["train_loss"] > 0 for e in events if isinstance(e, EpochEvent))
    # A finished job's stream replays it: the same epochs, then its end.
    replay = list(sdk.stream(job["id"]))
    assert [e.metrics["epoch"] for e in replay if isinstance(e, EpochEvent)] == list(range(1, 9))
    assert isinstance(replay[-1], EndEvent)
    assert [m["epoch"] for m in sdk.follow(job["id"])] == list(range(1, 9))


def test_stream_of_an_unknown_job_is_a_404(sdk):
    with pytest.raises(KilnError) as error:
        next(sdk.stream("no-such-job"))
    assert error.value.status == 404 and error.value.code == "not_found"


def test_metrics(sdk, iris_job):
    rows = sdk.metrics(iris_job["id"])
    assert [m["epoch"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "duration_s"} <= rows[0].keys()
    assert [m["epoch"] for m in sdk.metrics(iris_job["id"], since=4)] == [5, 6]


def test_metrics_max_points(sdk):
    """Needs the server's ?max_points=N."""
    job = sdk.wait(sdk.submit({"name": "sdk-many", "data": {"dataset": "iris"}, "epochs": 60})["id"], timeout=180)
    rows = sdk.metrics(job["id"], max_points=12)
    assert len(rows) <= 12 and rows[0]["epoch"] == 1 and rows[-1]["epoch"] == 60


def test_list_iterates_pages(sdk):
    name = f"sdk-list-{uuid.uuid4().hex[:6]}"
    ids = [sdk.submit({"name": name, "data": {"dataset": "iris"}, "epochs": 1})["id"] for _ in range(3)]
    assert [j["id"] for j in sdk.list(name=name, page_size=1)] == ids[::-1], "newest first, across pages"
    assert [j["id"] for j in sdk.list(name=name, limit=2, page_size=1)] == ids[:0:-1]
    assert sdk.jobs(limit=1)[0]["id"] == ids[-1]
    for job_id in ids:
        sdk.wait(job_id, timeout=120)
    assert {j["id"] for j in sdk.list(status="succeeded", name=name)} == set(ids)
    assert not [*sdk.list(status=["failed", "cancelled"], name=name)]


def test_download(sdk, iris_job, tmp_path):
    from models.weights import load_weights

    path = sdk.download(iris_job["id"], tmp_path / "iris.safetensors")
    assert path == tmp_path / "iris.safetensors" and not (tmp_path / "iris.safetensors.part").exists()
    assert load_weights(path)[1]["job_id"] == iris_job["id"]
    digest = httpx.get(f"{sdk.url}/v1/jobs/{iris_job['id']}/weights",
                       headers=sdk._http.headers).headers["etag"].strip('"')
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # A directory: the server's file name (the job's name) inside it.
    assert sdk.download(iris_job["id"], tmp_path) == tmp_path / "sdk-iris.safetensors"
    with pytest.raises(KilnError) as error:
        sdk.download(iris_job["id"], tmp_path / "enc.safetensors", part="encoder")
    assert error.value.status == 409 and not (tmp_path / "enc.safetensors").exists()


def test_predict(sdk, iris_job):
    answer = sdk.predict(iris_job["id"], [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
    assert answer["job_id"] == iris_job["id"] and len(answer["predictions"]) == 2
    assert all(abs(sum(p) - 1) < 1e-4 for p in answer["probabilities"])
    assert sdk.predict(iris_job["id"], [5.1, 3.5, 1.4, 0.2])["predictions"] == answer["predictions"][:1]
    assert sdk.predict(iris_job["id"], np.array([[5.1, 3.5, 1.4, 0.2]]))["predictions"] == answer["predictions"][:1]
    with pytest.raises(KilnError) as error:
        sdk.predict(iris_job["id"], [[1.0, 2.0]])
    assert error.value.status == 422


def test_cancel_and_history(sdk):
    job = sdk.submit({**LONG, "name": "sdk-cancel"})
    assert sdk.cancel(job["id"])["status"] in {"cancelled", "running"}
    assert sdk.wait(job["id"], timeout=120, poll=0.1)["status"] == "cancelled"
    kinds = [e["kind"] for e in sdk.history(job["id"])]
    assert kinds[0] == "queued" and kinds[-1] == "cancelled"
    with pytest.raises(KilnError) as error:
        sdk.cancel(job["id"])
    assert error.value.status == 409


def test_logs(sdk, iris_job):
    """Needs the server's GET /v1/jobs/{id}/logs."""
    text = sdk.logs(iris_job["id"])
    assert isinstance(text, str) and "epoch 6" in text


def test_datasets(sdk, tmp_path):
    csv = tmp_path / "line.csv"
    csv.write_text("x,y\n" + "".join(f"{i},{2 * i + 1}.5\n" for i in range(30)))
    ds = sdk.datasets.upload(csv, target="y")
    assert ds["name"] == "line" and ds["task"] == "regression" and ds["rows"] == 30 and ds["features"] == 1
    assert sdk.datasets.get(ds["id"]) == ds
    assert ds["id"] in [d["id"] for d in sdk.datasets.list(page_size=1)]
    npz = tmp_path / "arrays.npz"
    np.savez(npz, x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    assert sdk.datasets.upload(npz, name="arrays")["task"] == "binary"


def test_errors_are_one_sentence(stack, sdk):
    with Client("http://127.0.0.1:9", api_key="x") as down, pytest.raises(KilnError) as error:
        down.get("x")
    assert error.value.status == 0 and error.value.code == "unreachable"
    assert error.value.message.startswith("cannot reach the kiln API at http://127.0.0.1:9: ")
    assert error.value.message.endswith("(is `kiln up` running?)") and "\n" not in error.value.message

    with Client(stack.url, api_key="kiln_wrong") as wrong, pytest.raises(KilnError) as error:
        next(wrong.list())
    assert error.value.status == 401
    assert error.value.message.startswith("Unknown API key") and "the api_key given to Client" in error.value.message

    with pytest.raises(KilnError) as error:
        sdk.get("no-such-job")
    assert (error.value.status, error.value.code, str(error.value)) == (404, "not_found", "No job with id 'no-such-job'.")


# --- without a server: the stream's reconnection and fallback, plot ----------------------------------------


def _job(status="running", done=0, epochs=3):
    return {"id": "j1", "name": None, "status": status, "epochs_completed": done, "attempt": 1, "worker": "w",
            "checkpoint_epoch": done, "spec": {"epochs": epochs, "loss": "mse"}, "latest_metrics": None,
            "error": None, "stop_reason": None}


def _metrics(n):
    return {"epoch": n, "attempt": 1, "train_loss": 1.0 / n, "val_loss": 1.5 / n, "val_accuracy": None, "lr": 0.01,
            "duration_s": 0.1, "samples_per_s": 1000.0, "val_r2": 0.5 + n / 10}


def _sse(event, data, event_id):
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


class Dropped(httpx.SyncByteStream):
    """Sends some events, then the connection drops."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_stream_resumes_after_a_dropped_connection_with_last_event_id():
    seen_ids = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers.get("last-event-id"))
        if len(seen_ids) == 1:
            chunks = [b": keepalive\n\n", _sse("status", _job(), 0), _sse("epoch", _metrics(1), 1),
                      _sse("epoch", _metrics(2), 2), b"event: epoch\ndata: {\"epoch\": 3"]  # cut mid-event
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Dropped(chunks))
        body = (_sse("status", _job(done=2), 2) + _sse("epoch", _metrics(2), 2)  # a replay is skipped
                + _sse("novel", {"x": 1}, 2) + _sse("epoch", _metrics(3), 3) + _sse("end", _job("succeeded", 3), 3))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(handler)) as client:
        events = list(client.stream("j1", poll=0.01))
    assert seen_ids == [None, "2"]
    assert [type(e).__name__ for e in events] == ["StatusEvent", "EpochEvent", "EpochEvent", "StatusEvent",
                                                   "EpochEvent", "EndEvent"]
    assert [e.metrics["epoch"] for e in events if isinstance(e, EpochEvent)] == [1, 2, 3]
    assert [e.id for e in events] == [0, 1, 2, 2, 3, 3]
    assert events[-1].job["status"] == "succeeded"


def test_stream_polls_a_server_without_the_events_route():
    calls = {"job": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/events"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found.", "details": None}})
        if path.endswith("/metrics"):
            since = int(request.url.params["since"])
            done = min(calls["job"], 3)
            return httpx.Response(200, json={"job_id": "j1", "epochs": [_metrics(n) for n in range(since + 1, done + 1)]})
        calls["job"] += 1
        return httpx.Response(200, json=_job("succeeded" if calls["job"] >= 3 else "running", min(calls["job"], 3)))

    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(handler)) as client:
        events = list(client.stream("j1", poll=0.01))
        assert [type(e).__name__ for e in events] == ["StatusEvent", "EpochEvent", "EpochEvent", "EpochEvent",
                                                       "EndEvent"]
        assert [e.metrics["epoch"] for e in events if isinstance(e, EpochEvent)] == [1, 2, 3]
        assert events[-1].job["status"] == "succeeded"
        assert not client._events_route, "remembered: the next stream polls at once"


def test_stream_raises_for_an_unknown_job_and_when_the_server_stays_away():
    def missing(request):
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "No job with id 'j1'."}})

    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(missing)) as client:
        with pytest.raises(KilnError, match="No job with id 'j1'"):
            list(client.stream("j1"))
        assert client._events_route

    def down(request):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(down)) as client:
        started = time.monotonic()
        with pytest.raises(KilnError) as error:
            list(client.stream("j1", poll=0.01, reconnect_for=0.3))
        assert error.value.status == 0 and "Connection refused" in error.value.message
        assert time.monotonic() - started >= 0.3, "gave up before reconnect_for"


def test_download_refuses_a_damaged_file(tmp_path):
    def handler(request):
        return httpx.Response(200, content=b"not the weights", headers={"etag": '"' + "0" * 64 + '"'})

    client = Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(handler))
    with client, pytest.raises(KilnError, match="arrived damaged"):
        client.download("j1", tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def _plot_server(request):
    if request.url.path.endswith("/metrics"):
        assert request.url.params["max_points"] == "1000"
        return httpx.Response(200, json={"job_id": "j1", "epochs": [_metrics(n) for n in (1, 2, 3)]})
    return httpx.Response(200, json=_job("succeeded", 3))


def test_plot_says_how_to_get_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    client = Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(_plot_server))
    with client, pytest.raises(ImportError, match="pip install matplotlib"):
        client.plot("j1")


def test_plot_draws_the_curves(monkeypatch, tmp_path):
    """With a stand-in for matplotlib's Figure (matplotlib itself is optional): what is drawn, and where it goes."""
    drawn = {}

    class Axes:
        def __init__(self, i):
            self.i = i

        def plot(self, x, y, label):
            drawn.setdefault(self.i, {})[label] = (list(x), list(y))

        def set(self, **kw):
            pass

        def set_yscale(self, scale):
            drawn[f"scale{self.i}"] = scale

        def legend(self):
            pass

    class Figure:
        def __init__(self, **kw):
            pass

        def subplots(self, rows, cols, squeeze):
            return [[Axes(i) for i in range(cols)]]

        def suptitle(self, title):
            drawn["title"] = title

        def savefig(self, path):
            Path(path).write_text("png")

    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", types.SimpleNamespace(Figure=Figure))
    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(_plot_server)) as client:
        assert isinstance(client.plot("j1"), Figure)
        assert client.plot("j1", tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_text() == "png"
    assert drawn[0]["train loss"] == ([1, 2, 3], [1.0, 0.5, 1 / 3])
    assert drawn[0]["val loss"][1] == [1.5, 0.75, 0.5]
    assert drawn[1]["val R²"][1] == [0.6, 0.7, 0.8]
    assert drawn["scale0"] == "log" and drawn["title"] == "j1: succeeded, 3/3 epochs"


def test_progress_and_eta_helpers():
    assert job_progress({"status": "running", "epochs_completed": 3, "spec": {"epochs": 12}}) == 0.25
    assert job_progress({"status": "running", "progress": 0.4, "epochs_completed": 3, "spec": {"epochs": 12}}) == 0.4
    assert job_eta({"status": "running", "epochs_completed": 8, "spec": {"epochs": 10}}, [1.5, 2.5]) == 4.0
    assert job_eta({"status": "running", "eta_seconds": 12.5, "epochs_completed": 8, "spec": {"epochs": 10}}) == 12.5
    assert job_eta({"status": "queued", "epochs_completed": 0, "spec": {"epochs": 10}, "latest_metrics": None}) is None
    assert job_eta({"status": "failed", "epochs_completed": 2, "spec": {"epochs": 10}}, [1.0]) is None


def test_wait_waits_out_a_brief_outage():
    answers = iter([httpx.Response(503, json={"error": {"code": "database_unavailable", "message": "down"}}),
                    httpx.ConnectError("refused"), httpx.Response(200, json=_job("running", 1)),
                    httpx.Response(200, json=_job("succeeded", 3))])

    def handler(request):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with Client("http://kiln.test", api_key="k", transport=httpx.MockTransport(handler)) as client:
        assert client.wait("j1", timeout=30, poll=0.01)["status"] == "succeeded"
