"""`kiln up` as a new user runs it: embedded broker, SQLite, API and worker, then Ctrl-C."""

import os
import re
import signal
import stat
import subprocess
import sys

import httpx
import psutil
import pytest

from kiln.embedded import free_port, wait_until
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def _start_up(tmp_path, port: int, extra_env: dict[str, str], *args: str) -> tuple[subprocess.Popen, object]:
    # Nothing configured: every service must come from the embedded defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(HOME=str(tmp_path / "home"), **extra_env)
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "state"), *args],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return process, log


def _output(log) -> str:
    log.seek(0)
    return log.read()


def test_up_serves_trains_and_stops_cleanly(tmp_path):
    port = free_port()
    process, log = _start_up(tmp_path, port, {})
    try:
        wait_until(lambda: "kiln is up" in _output(log) or process.poll() is not None, timeout=90, what="kiln up")
        out = _output(log)
        assert process.poll() is None, out
        key = re.search(r"API key:\s+(\S+)", out).group(1)
        assert f"http://127.0.0.1:{port}" in out and "(embedded)" in out
        assert "  workers:   1 CPU training process, a predictor\n" in out

        state = tmp_path / "state"
        assert (state / "api_key").read_text().strip() == key
        assert stat.S_IMODE((state / "api_key").stat().st_mode) == 0o600, "key readable by the user only"
        assert (state / "kiln.db").exists()

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as api:
            job = api.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 3}).json()
            wait_until(lambda: api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", timeout=60,
                       what="the job to succeed")
            assert api.get(f"/v1/jobs/{job['id']}/weights").status_code == 200
            assert (state / "artifacts" / "jobs" / job["id"] / "weights.safetensors").exists()
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4, "broker, API, trainer and predictor"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
    assert code == 0, _output(log)
    assert "stopping kiln" in _output(log)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {alive}"


def test_up_uses_kiln_api_key(tmp_path):
    port = free_port()
    process, log = _start_up(tmp_path, port, {"KILN_API_KEY": "kiln_my_own_key"})
    try:
        wait_until(lambda: "kiln is up" in _output(log) or process.poll() is not None, timeout=90, what="kiln up")
        assert "kiln_my_own_key" in _output(log)
        url = f"http://127.0.0.1:{port}/v1/jobs"
        assert httpx.get(url, headers={"Authorization": "Bearer kiln_my_own_key"}).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Bearer other"}).status_code == 401
        assert not (tmp_path / "state" / "api_key").exists()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


def test_up_on_a_gpu_host_gives_each_gpu_its_own_worker_and_hides_them_from_the_cpu_one(tmp_path):
    """As `kiln worker` does: a process pinned to each GPU, and the CPU worker sees none, so a job it takes
    trains on the CPU. The GPU is pretend (an nvidia-smi on PATH that lists one); the processes are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho '0, GPU-aaaa, NVIDIA H100 80GB HBM3, 81559'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    port = free_port()
    process, log = _start_up(tmp_path, port, {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait_until(lambda: "kiln is up" in _output(log) or process.poll() is not None, timeout=90, what="kiln up")
        out = _output(log)
        assert process.poll() is None, out
        key = re.search(r"API key:\s+(\S+)", out).group(1)
        assert "  workers:   GPU 0 (NVIDIA H100 80GB HBM3), 1 CPU training process, a predictor\n" in out
        workers = httpx.get(f"http://127.0.0.1:{port}/v1/workers", headers={"Authorization": f"Bearer {key}"}).json()
        by_queues = {tuple(w["queues"]): w for w in workers["items"]}
        assert set(by_queues) == {("kiln", "kiln.auto"), ("kiln.auto", "kiln.gpu"), ("kiln.predict",)}, workers
        # What CUDA will let each process use (this host's torch has no CUDA, so the registry cannot show it).
        cuda_visible = {
            child.cmdline()[child.cmdline().index("--hostname") + 1]: child.environ().get("CUDA_VISIBLE_DEVICES")
            for child in psutil.Process(process.pid).children() if "--hostname" in child.cmdline()
        }
        assert cuda_visible == {w["name"]: visible for w, visible in (
            (by_queues["kiln.auto", "kiln.gpu"], "GPU-aaaa"), (by_queues["kiln", "kiln.auto"], ""),
            (by_queues["kiln.predict",], ""))}
        assert by_queues["kiln.auto", "kiln.gpu"]["name"].startswith("kiln-gpu0-")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, _output(log)
