"""A running kiln for the service benchmarks: a throwaway PostgreSQL database, a Redis broker, the API
(uvicorn, as `kiln up` and docker-compose run it) and Celery workers, all stopped and dropped on exit.

The workers run `celery -A bench.probe worker ...`: kiln's worker command line (kiln.launch.worker_command) with
the app module swapped for bench.probe, which is worker.celery_app plus two timestamps (see bench/probe.py).

Options every service benchmark takes:
    --database-url  PostgreSQL server to create the throwaway database on
                    (default $KILN_BENCH_DATABASE_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/test)
    --broker-url    Redis to use (default $KILN_BENCH_BROKER_URL, else a private redis-server on a free port,
                    as `kiln up` starts one)
"""

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Engine

from kiln.dispatch import make_celery
from kiln.embedded import EmbeddedRedis, free_port, stop_process, wait_until
from kiln.launch import worker_command
from kiln.migrate import upgrade
from kiln.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=os.environ.get("KILN_BENCH_DATABASE_URL", DEFAULT_DATABASE),
                        help="PostgreSQL server on which a throwaway database is created and dropped")
    parser.add_argument("--broker-url", default=os.environ.get("KILN_BENCH_BROKER_URL"),
                        help="Redis URL; default: a private redis-server on a free port")
    parser.add_argument("--keep-logs", action="store_true", help="print where the processes' logs are, keep them")


@dataclass
class Stack:
    url: str
    api_key: str
    env: dict[str, str]
    settings: Settings
    database_url: str
    logs: Path
    run_id: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)  # process name -> Celery hostname

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60,
                            **kwargs)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.broker_url)

    def engine(self) -> Engine:
        return create_engine(self.database_url, pool_size=2)

    @property
    def probe_key(self) -> str:
        """The Redis list bench.probe pushes its timestamps onto."""
        return self.env["KILN_BENCH_PROBE_KEY"]

    def start_worker(self, name: str, concurrency: int, queue: str | None = None, app: str = "bench.probe") -> str:
        """Start a worker process (prefork, `concurrency` pool processes); returns its Celery hostname."""
        hostname = f"{name}-{self.run_id}@{os.uname().nodename}"
        cmd = worker_command(concurrency, queue or self.settings.queue, hostname)
        cmd[cmd.index("worker.celery_app")] = app
        self.processes[name] = _start(cmd, self.env, self.logs / f"{name}.log")
        self.workers[name] = hostname
        return hostname

    def wait_for_workers(self, timeout: float = 120) -> None:
        celery = make_celery(self.settings)
        try:
            for hostname in self.workers.values():
                wait_until(lambda h=hostname: self._alive() and celery.control.ping([h], timeout=0.5),
                           timeout, what=f"worker {hostname}")
        finally:
            celery.close()

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        self.workers.pop(name, None)
        if process is not None:
            stop_process(process)

    def _alive(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited early (code {process.returncode}):\n{log}")
        return True


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head, dropped afterwards."""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"kiln_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def broker(url: str | None, directory: Path) -> Iterator[str]:
    if url:
        yield url
        return
    with EmbeddedRedis(directory / "redis") as embedded:
        yield embedded.url


@contextlib.contextmanager
def running(args: argparse.Namespace, *, api: bool = True, api_workers: int = 1,
            extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Database, broker and (unless api=False) the API; the caller starts its workers with stack.start_worker
    and then calls stack.wait_for_workers(). Everything is stopped, and the database dropped, on exit."""
    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"kiln-bench-{run_id}-"))
    logs = workdir / "logs"
    logs.mkdir()
    with throwaway_database(args.database_url) as database_url, broker(args.broker_url, workdir) as broker_url:
        api_key = "kiln_bench_" + secrets.token_urlsafe(16)
        env = {
            **os.environ,
            "KILN_DATA_DIR": str(workdir / "data"),
            "KILN_DATABASE_URL": database_url,
            "KILN_BROKER_URL": broker_url,
            "KILN_API_KEY": api_key,
            "KILN_QUEUE": f"kiln-bench-{run_id}",
            "KILN_BENCH_PROBE_KEY": f"kiln-bench-probe-{run_id}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        }
        settings = Settings(data_dir=workdir / "data", database_url=database_url, broker_url=broker_url,
                            queue=env["KILN_QUEUE"])
        port = free_port()
        stack = Stack(url=f"http://127.0.0.1:{port}", api_key=api_key, env=env, settings=settings,
                      database_url=database_url, logs=logs, run_id=run_id)
        try:
            if api:
                api_env = env
                if api_workers > 1:  # as `kiln up` runs several: /metrics sums them (api/observability.py)
                    (workdir / "api-metrics").mkdir()
                    api_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(workdir / "api-metrics")}
                stack.processes["api"] = _start(
                    [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning", "--workers", str(api_workers)],
                    api_env, logs / "api.log")
                wait_until(lambda: stack._alive() and _ready(stack.url), 60, 0.1, what="the API")
            yield stack
        finally:
            for name in list(stack.processes):
                stack.stop(name)
            with contextlib.suppress(Exception), stack.redis() as r:
                r.delete(stack.probe_key)
            if args.keep_logs:
                print(f"logs kept in {logs}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
