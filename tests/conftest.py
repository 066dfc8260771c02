"""Test fixtures that start real services: a broker, a database, an API server and a Celery worker.

By default: an embedded redis-server on a free port and SQLite in a temporary directory.
With KILN_TEST_DATABASE_URL (PostgreSQL) and/or KILN_TEST_BROKER_URL (Redis), the same suite runs
against those servers instead, each test session in its own fresh database and its own queue.
"""

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Engine

from kiln.db import make_engine, reset_engine
from kiln.dispatch import make_celery, predict_queue, worker_queues
from kiln.embedded import EmbeddedRedis, free_port, stop_process, wait_until
from kiln.launch import worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models train fastest on one thread, and far faster when another process busies a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_database(tmp_path_factory) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases: SQLite files, or throwaway PostgreSQL databases on the
    server named by KILN_TEST_DATABASE_URL (all dropped when the session ends)."""
    server = os.environ.get("KILN_TEST_DATABASE_URL")
    created: list[str] = []

    def make() -> str:
        if not server:
            return f"sqlite:///{tmp_path_factory.mktemp('db') / 'kiln.db'}"
        name = f"kiln_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(server).set(database=name).render_as_string(hide_password=False)

    admin = create_engine(server, isolation_level="AUTOCOMMIT") if server else None
    try:
        yield make
    finally:
        if admin is not None:
            with admin.connect() as conn:
                for name in created:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


@pytest.fixture(scope="session")
def database_url(make_database) -> str:
    return make_database()


@pytest.fixture
def engine(make_database) -> Iterator[Engine]:
    """An engine on a fresh, migrated database of the test's own."""
    url = make_database()
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def kiln_database_at(monkeypatch):
    """Points this process's kiln settings at a database URL; they are forgotten afterwards."""

    def use(url: str) -> None:
        monkeypatch.setenv("KILN_DATABASE_URL", url)
        get_settings.cache_clear()
        reset_engine()

    yield use
    get_settings.cache_clear()
    reset_engine()


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory) -> Iterator[str]:
    if server := os.environ.get("KILN_TEST_BROKER_URL"):
        yield server
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as embedded:
        yield embedded.url


@dataclass
class Stack:
    """A running kiln: API server and worker processes, with what a test needs to talk to them."""

    url: str
    api_key: str
    env: dict[str, str]
    settings: Settings
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self, api_key: str | None = None) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def wait_for_job(self, client: httpx.Client, job_id: str, predicate, timeout: float = 120) -> dict:
        return wait_for_job(client, job_id, predicate, timeout)

    def kiln(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        """Runs the `kiln` command against this stack's database, as an operator would (env: KILN_... on top)."""
        return subprocess.run(
            [sys.executable, "-m", "kiln.cli", *args], env={**self.env, **env}, cwd=ROOT, capture_output=True,
            text=True, timeout=60,
        )

    def create_key(self, owner: str) -> str:
        """A new API key for owner (`kiln keys create`), which makes a new owner of a new name."""
        done = self.kiln("keys", "create", "--owner", owner)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def queue_length(self) -> int:
        with redis.Redis.from_url(self.settings.broker_url) as r:
            return r.llen(self.settings.queue)


def wait_for_job(http: httpx.Client, job_id: str, predicate, timeout: float = 120) -> dict:
    """Poll the job until predicate(job) holds; as a real client would during an outage, a 503 or a
    dropped connection means "ask again"."""

    def check() -> dict | None:
        try:
            response = http.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            return None
        if response.status_code == 503:
            return None
        job = response.json()
        return job if predicate(job) else None

    return wait_until(check, timeout, interval=0.02, what=f"job {job_id} to reach a condition")


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def api_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "warning",
    ]


@pytest.fixture(scope="session")
def stack(request, tmp_path_factory, database_url: str, broker_url: str) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("kiln-data")
    logs = tmp_path_factory.mktemp("logs")
    api_key = "kiln_test_" + secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "KILN_DATA_DIR": str(data_dir),
        "KILN_DATABASE_URL": database_url,
        "KILN_BROKER_URL": broker_url,
        "KILN_API_KEY": api_key,
        "KILN_QUEUE": f"kiln-test-{uuid.uuid4().hex[:8]}",
        "KILN_LEASE_S": "5",
        "KILN_HEARTBEAT_S": "0.2",
        "KILN_RECONCILE_INTERVAL_S": "0.5",
        "KILN_LOST_MESSAGE_GRACE_S": "2",
        "KILN_OUTBOX_GRACE_S": "1",
        "KILN_MAX_ACTIVE_JOBS": "12",
    }
    settings = Settings(
        data_dir=data_dir, database_url=database_url, broker_url=broker_url, queue=env["KILN_QUEUE"],
        max_active_jobs=int(env["KILN_MAX_ACTIVE_JOBS"]),
    )
    upgrade(database_url)
    port = free_port()
    hostname = f"test-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    stack = Stack(url=f"http://127.0.0.1:{port}", api_key=api_key, env=env, settings=settings, logs=logs)
    stack.processes["worker"] = start_process(
        worker_command(1, worker_queues(settings, gpu=False), hostname), env, logs / "worker.log"
    )
    stack.processes["predictor"] = start_process(
        worker_command(1, predict_queue(settings), f"predict-{hostname}"), env, logs / "predictor.log"
    )
    stack.processes["api"] = start_process(api_command(port), env, logs / "api.log")
    celery = make_celery(settings)
    try:
        wait_until(lambda: _api_ready(stack), timeout=60, interval=0.1, what="the API server")
        for name in (hostname, f"predict-{hostname}"):
            wait_until(lambda n=name: celery.control.ping([n], timeout=0.5), timeout=60, what=f"worker {name}")
        yield stack
    finally:
        for process in stack.processes.values():
            stop_process(process)
        celery.close()
        # The processes' logs are evidence when something failed; keep quiet otherwise.
        for log in sorted(logs.iterdir()) if request.session.testsfailed else ():
            sys.stderr.write(f"\n----- {log.name} (last lines) -----\n")
            sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-40:]) + "\n")


def _api_ready(stack: Stack) -> bool:
    for name, process in stack.processes.items():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{(stack.logs / f'{name}.log').read_text()[-3000:]}")
    return _ok(f"{stack.url}/readyz")


@contextmanager
def second_api(stack: Stack, name: str, timeout: float = 60, **env: str) -> Iterator[Stack]:
    """Another API server on the stack's database, broker and store, with `env` on top of the stack's (KILN_...)."""
    env = {**stack.env, **env}
    port = free_port()
    other = Stack(url=f"http://127.0.0.1:{port}", api_key=stack.api_key, env=env, settings=stack.settings,
                  logs=stack.logs)
    other.processes["api"] = start_process(api_command(port), env, stack.logs / f"{name}.log")
    try:
        wait_until(lambda: answers(f"{other.url}/readyz", other.processes["api"], stack.logs / f"{name}.log"),
                   timeout=timeout, interval=0.1, what=f"the API server {name}")
        yield other
    finally:
        stop_process(other.processes["api"])


def answers(url: str, process: subprocess.Popen, log: Path) -> bool:
    """Whether GET url answers 200 yet (for wait_until); raises with the end of its log if the process that should
    answer has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"{process.args[:4]} exited early:\n{log.read_text(errors='replace')[-3000:]}")
    return _ok(url)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures see whether the test failed (item.rep_call.failed) and print process logs then.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_collection_modifyitems(items):
    # A test on the running stack (API server, worker, broker) is end to end whichever module holds it, so
    # `-m "not e2e"` selects the tests that need no services.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
