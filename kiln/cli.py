"""The `kiln` command: run the service (`up`, `worker`, `migrate`) and use it (`submit`, `show`, ...)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from kiln.client import Client, KilnError
from kiln.dispatch import predict_queue
from kiln.embedded import EmbeddedRedis, wait_until
from kiln.settings import get_settings


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class KilnGroup(click.Group):
    """Turns API and connection errors into one readable line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            _fail(exc.message, 2 if exc.status == 0 else 1)


@click.group(cls=KilnGroup)
@click.version_option(package_name="kiln")
def main() -> None:
    """kiln: training jobs as a service."""


# ---- running the service -------------------------------------------------------------------------


def _ensure_api_key(data_dir: Path) -> str:
    """KILN_API_KEY when set, else the key kept in data_dir/api_key (created once, readable by the user only)."""
    if key := os.environ.get("KILN_API_KEY"):
        return key
    path = data_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    key = "kiln_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def worker_command(concurrency: int, queue: str, hostname: str | None = None) -> list[str]:
    """The Celery worker command line every kiln worker runs (`kiln up`, `kiln worker`, the tests)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
        "--concurrency", str(concurrency), "--queues", queue, "--loglevel", "INFO",
        "--hostname", hostname or f"kiln-{os.getpid()}@{socket.gethostname()}", "--without-mingle",
        "--without-gossip",
    ]


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API binds to.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port the API listens on.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="All state goes here.")
@click.option("--concurrency", default=1, show_default=True, type=int, help="Training processes.")
def up(host: str, port: int, data_dir: Path | None, concurrency: int) -> None:
    """Start everything on this machine: broker, database, API and one worker."""
    if data_dir:
        os.environ["KILN_DATA_DIR"] = str(data_dir.resolve())
    get_settings.cache_clear()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_key = _ensure_api_key(settings.data_dir)

    children: list[subprocess.Popen] = []
    broker = None
    # Explicit handlers: a process started in the background inherits an ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if not settings.broker_url:
            broker = EmbeddedRedis(settings.data_dir / "redis").start()
            os.environ["KILN_BROKER_URL"] = broker.url
        os.environ["KILN_WORKER_CONCURRENCY"] = str(concurrency)
        get_settings.cache_clear()
        settings = get_settings()

        from kiln.migrate import upgrade

        upgrade(settings.db_url)
        env = {**os.environ, "KILN_API_KEY": api_key}
        # Own sessions: Ctrl-C reaches only this process, which then stops the children in order
        # (API first, then the worker, which finishes or hands back its job, then the broker).
        children.append(
            subprocess.Popen(worker_command(concurrency, settings.queue), env=env, start_new_session=True)
        )
        children.append(  # predictions have their own process, so long training never delays them
            subprocess.Popen(
                worker_command(1, predict_queue(settings), f"predict-{os.getpid()}@{socket.gethostname()}"),
                env=env, start_new_session=True,
            )
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", host,
                 "--port", str(port), "--log-level", "warning"],
                env=env, start_new_session=True,
            )
        )
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(url, children)
        (settings.data_dir / "server.json").write_text(json.dumps({"url": url}))
        click.echo(
            f"\nkiln is up.\n"
            f"  API:       {url}   (docs: {url}/docs)\n"
            f"  API key:   {api_key}\n"
            f"  data dir:  {settings.data_dir}\n"
            f"  broker:    {settings.broker_url}{'  (embedded)' if broker else ''}\n"
            f"  database:  {settings.db_url}\n\n"
            f"Try:  kiln submit examples/digits.json --follow\n"
            f"Stop: Ctrl-C\n"
        )
        os.wait()  # returns when any child (API, worker, broker) exits; Ctrl-C interrupts it
        _fail("a kiln process exited unexpectedly; see the log above")
    except KeyboardInterrupt:
        click.echo("\nstopping kiln...")
    finally:
        for child in reversed(children):  # the API first, then the workers (which hand their jobs back)
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
        if broker:
            broker.stop()


def _wait_ready(url: str, children: list[subprocess.Popen]) -> None:
    def ready() -> bool:
        if any(child.poll() is not None for child in children):
            _fail("a kiln process failed to start; see the log above")
        try:
            api_ok = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
        from kiln.dispatch import producer

        return api_ok and len(producer().control.ping(timeout=0.5)) >= 2  # the trainer and the predictor

    wait_until(ready, timeout=120, interval=0.25, what="the API and the worker")


@main.command()
@click.option("--concurrency", "-c", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--role", type=click.Choice(["train", "predict"]), default="train", show_default=True,
              help="train: run training jobs; predict: answer /predict requests from trained weights.")
@click.option("--queue", "-Q", default=None, help="Queue to consume (default: from KILN_QUEUE and the role).")
def worker(concurrency: int, role: str, queue: str | None) -> None:
    """Run a worker against KILN_BROKER_URL and KILN_DATABASE_URL."""
    os.environ["KILN_WORKER_CONCURRENCY"] = str(concurrency)
    get_settings.cache_clear()
    settings = get_settings()
    default_queue = settings.queue if role == "train" else predict_queue(settings)
    os.execv(sys.executable, worker_command(concurrency, queue or default_queue))


@main.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    from kiln.migrate import upgrade

    upgrade(get_settings().db_url)
    click.echo("database is up to date")


# ---- using the service ---------------------------------------------------------------------------

url_option = click.option("--url", envvar="KILN_URL", default=None, help="API address (default: found from `kiln up`).")


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        _fail(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(spec, dict):
        _fail(f"{path} must hold one job spec object")
    return spec


def _epoch_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}", f"train_loss {m['train_loss']:.4f}"]
    if m.get("val_loss") is not None:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if m.get("val_accuracy") is not None:
        parts.append(f"val_acc {m['val_accuracy']:.4f}")
    parts.append(f"{m['duration_s']:.2f}s")
    return "  ".join(parts)


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--follow", "-f", is_flag=True, help="Print each epoch until the job ends.")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the first job.")
@url_option
def submit(spec_file: Path, follow: bool, idempotency_key: str | None, url: str | None) -> None:
    """Submit a job spec (JSON or YAML)."""
    with Client(url) as client:
        try:
            job = client.submit(_load_spec(spec_file), idempotency_key=idempotency_key)
        except KilnError as exc:
            if exc.status == 422 and isinstance(exc.details, list):
                lines = "\n".join(f"  {d['field']}: {d['message']}" for d in exc.details)
                _fail(f"{exc.message}\n{lines}")
            raise
        click.echo(f"submitted job {job['id']} ({job['status']})")
        if follow:
            epochs = job["spec"]["epochs"]
            for m in client.follow(job["id"]):
                click.echo(_epoch_line(m, epochs))
            job = client.get(job["id"])
            click.echo(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job["error"] else ""))
            if job["status"] != "succeeded":
                sys.exit(1)


@main.command()
@click.argument("job_id")
@url_option
def show(job_id: str, url: str | None) -> None:
    """Show one job as JSON."""
    with Client(url) as client:
        click.echo(json.dumps(client.get(job_id), indent=2))


@main.command()
@click.option("--status", multiple=True, help="Only jobs with this status (repeatable).")
@click.option("--limit", default=20, show_default=True, type=int)
@url_option
def jobs(status: tuple[str, ...], limit: int, url: str | None) -> None:
    """List the newest jobs."""
    with Client(url) as client:
        for job in client.jobs(status=list(status), limit=limit):
            latest = job["latest_metrics"] or {}
            loss = f"{latest['train_loss']:.4f}" if latest else "-"
            click.echo(
                f"{job['id']}  {job['status']:<9}  {job['epochs_completed']:>4}/{job['spec']['epochs']:<4}"
                f"  loss {loss:<8}  {job['name'] or ''}"
            )


@main.command()
@click.argument("job_id")
@url_option
def cancel(job_id: str, url: str | None) -> None:
    """Cancel a queued or running job."""
    with Client(url) as client:
        job = client.cancel(job_id)
        click.echo(f"job {job_id}: {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: JOB_ID.safetensors")
@url_option
def download(job_id: str, output: Path | None, url: str | None) -> None:
    """Download a succeeded job's weights (safetensors)."""
    with Client(url) as client:
        path = client.download(job_id, output or Path(f"{job_id}.safetensors"))
        click.echo(f"saved {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
