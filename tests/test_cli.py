"""The `kiln` command against a real stack (API, worker, predictor), run as a person runs it: a subprocess.

Exit codes: 0 done; 1 the API refused, or the followed job failed or was cancelled; 2 unreachable, or a usage error.
"""

import io
import json
import signal
import subprocess
import sys
import uuid

import pytest

from kiln.cli import Progress
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

IRIS = {"name": "cli-iris", "data": {"dataset": "iris"}, "epochs": 5}
DIVERGES = {"name": "cli-diverges", "data": {"dataset": "regression"}, "epochs": 30,
            "optimizer": {"type": "sgd", "lr": 10, "momentum": 0.99}}
LONG = {"name": "cli-long", "data": {"dataset": "regression", "samples": 20000}, "epochs": 10_000, "batch_size": 8}


def kiln(stack, *args: str, input: str | None = None, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args], env={**stack.env, "KILN_URL": stack.url, **env}, cwd=ROOT,
        capture_output=True, text=True, input=input, timeout=timeout,
    )


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


@pytest.fixture(scope="module")
def finished(stack, tmp_path_factory) -> str:
    """A succeeded iris job, submitted from YAML (with `lr: 3e-3`, which YAML 1.1 alone would read as a string)."""
    spec = tmp_path_factory.mktemp("specs") / "iris.yaml"
    spec.write_text("name: cli-iris\ndata: {dataset: iris}\noptimizer: {type: adam, lr: 3e-3}\nepochs: 5\n")
    done = kiln(stack, "submit", str(spec), "--follow")
    lines = ok(done).splitlines()
    assert lines[0].startswith("submitted job ") and lines[0].endswith("(queued)")
    job_id = lines[0].split()[2]
    epochs = [line for line in lines if line.startswith("epoch")]
    assert [line.split()[1] for line in epochs] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert all("train_loss" in line and "val_loss" in line and "val_acc" in line for line in epochs)
    assert all("ETA " in line for line in epochs[:-1]) and "ETA" not in epochs[-1]
    assert lines[-1] == f"job {job_id} succeeded"
    with stack.client() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["spec"]["optimizer"]["lr"] == 0.003
    return job_id


def test_submit_yaml_follow_succeeds(finished):
    assert finished


def test_submit_json_spec_and_quiet(stack, tmp_path):
    spec = tmp_path / "iris.json"
    spec.write_text(json.dumps({**IRIS, "epochs": 1}))
    job = json.loads(ok(kiln(stack, "submit", str(spec), "--json")))
    assert job["status"] == "queued" and job["spec"]["epochs"] == 1 and job["name"] == "cli-iris"

    job_id = ok(kiln(stack, "submit", str(spec), "-q")).strip()
    assert len(job_id) == 36 and "\n" not in job_id
    # A spec on stdin, as `kubectl apply -f -` takes one.
    assert ok(kiln(stack, "submit", "-", "-q", input=json.dumps({**IRIS, "epochs": 1}))).strip() != job_id


def test_submit_follow_json_prints_events_as_json_lines(stack, tmp_path):
    spec = tmp_path / "iris.json"
    spec.write_text(json.dumps({**IRIS, "epochs": 3}))
    events = [json.loads(line) for line in ok(kiln(stack, "submit", str(spec), "--follow", "--json")).splitlines()]
    assert [e["data"]["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"


def test_follow_exits_1_when_the_job_fails(stack, tmp_path):
    spec = tmp_path / "diverges.json"
    spec.write_text(json.dumps(DIVERGES))
    done = kiln(stack, "submit", str(spec), "--follow")
    assert done.returncode == 1, done.stderr
    last = done.stdout.splitlines()[-1]
    assert " failed: loss became" in last and "lower the learning rate" in last
    job_id = last.split()[1]
    # `watch` follows an existing job to the same end, with the same exit code.
    watched = kiln(stack, "watch", job_id)
    assert watched.returncode == 1 and watched.stdout.splitlines()[-1] == last


def test_follow_exits_1_when_the_job_is_cancelled(stack, tmp_path):
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps(LONG))
    env = {**stack.env, "KILN_URL": stack.url}
    follower = subprocess.Popen([sys.executable, "-m", "kiln.cli", "submit", str(spec), "--follow"], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = follower.stdout.readline()
        assert first.startswith("submitted job "), first + follower.stderr.read()
        job_id = first.split()[2]
        with stack.client() as http:
            stack.wait_for_job(http, job_id, lambda j: j["status"] == "running" and j["epochs_completed"] >= 1)
        assert ok(kiln(stack, "cancel", job_id)).strip() == f"job {job_id} is stopping (it ends at its next batch)"
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1, err
    assert out.splitlines()[-1] == f"job {job_id} cancelled"
    assert "already cancelled" in one_line_error(kiln(stack, "cancel", job_id), 1)


def test_jobs_is_an_aligned_table(stack, finished):
    out = ok(kiln(stack, "jobs", "--name", "cli-iris", "--limit", "50"))
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "NAME", "DATASET", "STATUS", "EPOCHS", "LOSS", "VAL_LOSS", "AGE"]
    row = next(r for r in rows if r.startswith(finished))
    assert row[header.index("STATUS"):].startswith("succeeded")
    assert row[header.index("DATASET"):].startswith("iris")
    assert "5/5" in row
    ours = ok(kiln(stack, "jobs", "--status", "succeeded", "-n", "1")).splitlines()
    assert len(ours) == 2 and ours[0].startswith("ID")
    assert kiln(stack, "jobs", "--status", "bogus").returncode == 2  # a usage error


def test_every_read_command_speaks_json(stack, finished):
    """--json prints one JSON document on stdout: what jq reads."""
    jobs = json.loads(ok(kiln(stack, "jobs", "--json", "--all")))
    assert finished in [j["id"] for j in jobs]
    job = json.loads(ok(kiln(stack, "show", finished, "--json")))
    assert job["id"] == finished and job["status"] == "succeeded"
    rows = json.loads(ok(kiln(stack, "metrics", finished, "--json")))
    assert [m["epoch"] for m in rows] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m in json.loads(ok(kiln(stack, "metrics", finished, "--json", "--since", "3")))] == [4, 5]
    events = json.loads(ok(kiln(stack, "history", finished, "--json")))
    assert [e["kind"] for e in events][-1] == "succeeded"
    assert isinstance(json.loads(ok(kiln(stack, "datasets", "list", "--json"))), list)
    lines = json.loads(ok(kiln(stack, "logs", finished, "--json")))
    assert isinstance(lines, list) and all(isinstance(line, str) for line in lines)


def test_show_is_human_readable(stack, finished):
    out = ok(kiln(stack, "show", finished))
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["id"].strip() == finished
    assert fields["status"].strip() == "succeeded"
    assert fields["progress"].strip() == "5/5 epochs (100%)"
    assert fields["dataset"].strip().startswith("iris")
    assert fields["model"].strip().startswith("mlp")
    assert fields["optimizer"].strip().startswith("adam  lr 0.003")
    assert fields["latest"].strip().startswith("epoch 5/5  train_loss ")


def test_show_says_why_a_job_waits_and_what_it_asked_for(stack, tmp_path):
    pool = f"nobody-{uuid.uuid4().hex[:6]}"  # a pool no worker serves: the job waits, and says why
    spec = tmp_path / "pool.json"
    spec.write_text(json.dumps({"data": {"dataset": "iris"}, "epochs": 2, "resources": {"queue": pool}}))
    job_id = ok(kiln(stack, "submit", str(spec), "--quiet")).strip()
    try:
        fields = dict(line.split(":", 1) for line in ok(kiln(stack, "show", job_id)).splitlines())
        assert fields["status"].strip() == "queued"
        assert f"kiln worker --queue {pool}" in fields["waiting"]
        assert fields["resources"].strip() == f"queue {pool}"
    finally:
        ok(kiln(stack, "cancel", job_id))


def test_metrics_table(stack, finished):
    header, *rows = ok(kiln(stack, "metrics", finished)).splitlines()
    assert header.split()[:4] == ["EPOCH", "TRAIN_LOSS", "VAL_LOSS", "TRAIN_ACC"]
    assert "VAL_ACC" in header and "VAL_R2" not in header  # only the columns the task has
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert all(len(row) == len(header) for row in rows), "right-aligned under the headers"


def test_metrics_max_points_downsamples(stack, tmp_path):
    """Needs the server's ?max_points=N."""
    spec = tmp_path / "many.json"
    spec.write_text(json.dumps({**IRIS, "name": "cli-many", "epochs": 40}))
    job_id = ok(kiln(stack, "submit", str(spec), "-q", "--follow")).strip()
    rows = json.loads(ok(kiln(stack, "metrics", job_id, "--json", "--max-points", "10")))
    assert len(rows) <= 10 and rows[0]["epoch"] == 1 and rows[-1]["epoch"] == 40
    refused = one_line_error(kiln(stack, "metrics", job_id, "--max-points", "10000000"), 1)
    assert "(query.max_points: " in refused


def test_logs(stack, finished):
    """Needs the server's GET /v1/jobs/{id}/logs."""
    out = ok(kiln(stack, "logs", finished))
    assert out.strip(), "the job's log has lines"
    assert "epoch 5" in out
    # --follow on a finished job prints the log once and ends.
    assert ok(kiln(stack, "logs", finished, "--follow")) == out


def test_logs_follow_a_running_job_prints_each_line_once(stack):
    """Following reads only the epochs it has not seen, several times while the job trains: what it printed is
    the whole log, each line once, in order."""
    with stack.client() as client:
        job = client.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 120}).json()
    followed = ok(kiln(stack, "logs", job["id"], "--follow"))
    whole = ok(kiln(stack, "logs", job["id"]))
    assert followed == whole
    assert sum(" epoch 120/120 " in line for line in followed.splitlines()) == 1
    assert followed.splitlines()[-1].split()[1] == "succeeded"


def test_download_and_predict(stack, finished, tmp_path):
    from models.weights import load_weights

    out = tmp_path / "iris.safetensors"
    saved = ok(kiln(stack, "download", finished, "-o", str(out)))
    assert saved.startswith(f"saved {out} (") and load_weights(out)[1]["job_id"] == finished
    ok(kiln(stack, "download", finished, "-o", str(tmp_path)))  # a directory: JOB_ID.safetensors in it
    assert (tmp_path / f"{finished}.safetensors").read_bytes() == out.read_bytes()
    refused = one_line_error(kiln(stack, "download", finished, "--part", "encoder"), 1)
    assert "autoencoder" in refused

    answer = json.loads(ok(kiln(stack, "predict", finished, "[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]", "--json")))
    assert len(answer["predictions"]) == 2 and len(answer["probabilities"][0]) == 3
    header, *rows = ok(kiln(stack, "predict", finished, input="[[5.1, 3.5, 1.4, 0.2]]")).splitlines()
    assert header.split() == ["ROW", "PREDICTION", "PROBABILITY"] and len(rows) == 1
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,c,d\n5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n")
    assert len(json.loads(ok(kiln(stack, "predict", finished, str(csv), "--json")))["predictions"]) == 2
    assert kiln(stack, "predict", finished, "not json").returncode == 2


def test_datasets_upload_list_show_and_train(stack, tmp_path):
    csv = tmp_path / "bands.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i % 3 + 0.1 * (i % 7)},{i % 5},{i % 3}\n" for i in range(60)))
    out = ok(kiln(stack, "datasets", "upload", str(csv), "--target", "label"))
    assert out.startswith("uploaded dataset ") and "(bands): classification, 60 rows, 2 features, 3 classes" in out
    dataset = json.loads(ok(kiln(stack, "datasets", "upload", str(csv), "-t", "label", "--name", "bands2", "--json")))
    assert dataset["name"] == "bands2" and dataset["rows"] == 60 and dataset["task"] == "classification"
    quiet = ok(kiln(stack, "datasets", "upload", str(csv), "-t", "label", "-q")).strip()
    assert len(quiet) == 36

    listed = json.loads(ok(kiln(stack, "datasets", "list", "--json")))
    assert {dataset["id"], quiet} <= {d["id"] for d in listed}
    header, *rows = ok(kiln(stack, "datasets", "list")).splitlines()
    assert header.split() == ["ID", "NAME", "TASK", "ROWS", "FEATURES", "CLASSES", "AGE"]
    assert any(row.startswith(dataset["id"]) for row in rows)
    assert json.loads(ok(kiln(stack, "datasets", "show", quiet, "--json")))["id"] == quiet
    assert "task:      classification" in ok(kiln(stack, "datasets", "show", quiet))

    spec = tmp_path / "bands.yaml"
    spec.write_text(f"data: {{dataset: {quiet}}}\nepochs: 2\n")
    assert ok(kiln(stack, "submit", str(spec), "--follow")).splitlines()[-1].endswith(" succeeded")

    missing_target = one_line_error(kiln(stack, "datasets", "upload", str(csv)), 1)
    assert "target" in missing_target and "label" in missing_target  # the server names the columns


def test_unreachable_server_is_one_line_and_exit_2(stack):
    for args in (["jobs"], ["show", "x"], ["metrics", "x"], ["logs", "x"], ["datasets", "list"], ["cancel", "x"]):
        line = one_line_error(kiln(stack, *args, KILN_URL="http://127.0.0.1:9"), 2)
        assert line.startswith("error: cannot reach the kiln API at http://127.0.0.1:9: ")
        assert line.endswith("(is `kiln up` running?)")


def test_wrong_key_is_one_line_and_exit_1(stack, finished):
    for args in (["jobs"], ["show", finished], ["metrics", finished], ["datasets", "list"]):
        line = one_line_error(kiln(stack, *args, KILN_API_KEY="kiln_wrong"), 1)
        assert line.startswith("error: Unknown API key") and "(the key came from KILN_API_KEY)" in line


def test_errors_from_the_api_are_one_line_and_exit_1(stack, tmp_path):
    assert one_line_error(kiln(stack, "show", "no-such-job"), 1) == "error: No job with id 'no-such-job'."
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"data": {"dataset": "digits"}, "loss": "mse"}))
    done = kiln(stack, "submit", str(invalid))
    assert done.returncode == 1 and "body.loss" in done.stderr and "cross_entropy" in done.stderr


def test_usage_errors_exit_2(stack, tmp_path):
    assert kiln(stack, "submit", str(tmp_path / "missing.yaml")).returncode == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: {dataset: iris\n")
    assert one_line_error(kiln(stack, "submit", str(broken)), 2).startswith(f"error: {broken} is not valid YAML")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{")
    assert "is not valid JSON" in one_line_error(kiln(stack, "submit", str(broken_json)), 2)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert "must hold one job spec" in one_line_error(kiln(stack, "submit", str(listed)), 2)
    assert kiln(stack, "nonsense").returncode == 2


# --- the progress display, without a stack -------------------------------------------------------------


class Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def _job(status="queued", done=0, epochs=4, **extra):
    return {"id": "j1", "status": status, "epochs_completed": done, "attempt": 1 if status != "queued" else 0,
            "worker": "w", "checkpoint_epoch": done, "spec": {"epochs": epochs}, "latest_metrics": None, **extra}


def _epoch(n, loss=0.5):
    return {"epoch": n, "train_loss": loss, "val_loss": loss + 0.1, "val_accuracy": 0.9, "duration_s": 2.0}


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = Tty()
    progress = Progress(_job(), out, tty=True)
    progress.status(_job("running"))
    progress.epoch(_epoch(1))
    progress.epoch(_epoch(2, 0.25))
    progress.end(_job("succeeded", 4, latest_metrics=_epoch(4)))
    text = out.getvalue()
    frames = [frame.removesuffix("\x1b[K") for frame in text.split("\r")[1:]]
    assert text.count("\n") == 1 and text.endswith("\n"), "one line, ended once"
    assert frames[0].startswith("epoch 0/4  ") and frames[0].endswith("0%")
    assert frames[1] == "epoch 1/4  █████░░░░░░░░░░░░░░░   25%  loss 0.5000  val_loss 0.6000  val_acc 0.9000  ETA 6s"
    assert frames[2] == "epoch 2/4  ██████████░░░░░░░░░░   50%  loss 0.2500  val_loss 0.3500  val_acc 0.9000  ETA 4s"
    assert frames[-1] == "succeeded  epoch 4/4  " + "█" * 20 + "  100%  loss 0.5000  val_loss 0.6000  val_acc 0.9000\x1b[K\n"

    monkeypatch.setenv("COLUMNS", "50")  # a narrow terminal: the ETA and the loss stay, the rest goes first
    narrow = Tty()
    progress = Progress(_job("running"), narrow, tty=True)
    progress.epoch(_epoch(1))
    assert narrow.getvalue() == "\repoch 1/4   25%  loss 0.5000  ETA 6s\x1b[K"


def test_progress_uses_the_servers_eta_and_writes_plain_lines_elsewhere():
    out = io.StringIO()
    progress = Progress(_job("running", 1, epochs=10, eta_seconds=90.0, progress=0.1), out, tty=False)
    progress.epoch(_epoch(2))
    progress.status(_job("running", 2, epochs=10, attempt=2, checkpoint_epoch=2))
    assert out.getvalue().splitlines() == [
        "epoch  2/10  train_loss 0.5000  val_loss 0.6000  val_acc 0.9000  2.00s  ETA 16s",
        "attempt 2 on w, resuming after epoch 2",
    ]
    on_tty = Progress(_job("running", 3, epochs=10, eta_seconds=95.0, progress=0.3), Tty(), tty=True)
    assert "ETA 1m35s" in on_tty.line() and " 30%" in on_tty.line()


def test_kiln_up_finds_the_url_and_key_by_itself(stack, finished, tmp_path):
    """What `kiln up` leaves in the data dir (server.json and api_key) is all the CLI needs."""
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / "server.json").write_text(json.dumps({"url": stack.url}))
    (data_dir / "api_key").write_text(stack.api_key + "\n")
    env = {k: v for k, v in stack.env.items() if k not in ("KILN_API_KEY", "KILN_URL")}
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "show", finished, "--json"],
                          env={**env, "KILN_DATA_DIR": str(data_dir)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert json.loads(ok(done))["id"] == finished


def test_ctrl_c_stops_following_not_the_job(stack, tmp_path):
    """Ctrl-C while following stops the following, not the job, and says so."""
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps({**LONG, "name": "cli-sigint"}))
    env = {**stack.env, "KILN_URL": stack.url}
    # SIGINT as a terminal has it (a shell's background job would inherit it ignored).
    follower = subprocess.Popen([sys.executable, "-m", "kiln.cli", "submit", str(spec), "--follow"], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    job_id = None
    try:
        job_id = follower.stdout.readline().split()[2]
        with stack.client() as http:
            stack.wait_for_job(http, job_id, lambda j: j["status"] == "running")
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=60)
        assert follower.returncode == 130
        assert f"stopped following job {job_id}; it goes on" in err and "Traceback" not in err
        with stack.client() as http:
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        if job_id:
            with stack.client() as http:
                http.post(f"/v1/jobs/{job_id}/cancel")
                stack.wait_for_job(http, job_id, lambda j: j["status"] == "cancelled")
