"""The `kiln` command: run the service (`up`, `worker`, `migrate`, `keys`) and use it (`submit`, `jobs`, `show`,
`metrics`, `logs`, `cancel`, `download`, `predict`, `datasets`, ...).

Exit codes: 0 done; 1 the API refused (an error answer) or the job failed or was cancelled; 2 the API could not be
reached, or the command line was wrong. Every read command takes `--json` (one JSON document on stdout, for jq).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import click
import httpx
import yaml

from kiln.client import (
    TERMINAL,
    Client,
    EndEvent,
    EpochEvent,
    EpochMetrics,
    Job,
    KilnError,
    StatusEvent,
    job_eta,
    job_progress,
)
from kiln.devices import Gpu, usable_cores
from kiln.settings import get_settings
from kiln.spec import ResourcesSpec

if TYPE_CHECKING:  # kiln.launch brings Celery in: imported where a command needs it
    from kiln.launch import WorkerProcess


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class KilnGroup(click.Group):
    """Turns API and connection errors into one readable line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            if exc.status == 422 and isinstance(exc.details, list) and exc.details:  # name each field and its fix
                rows = [f"{d.get('field')}: {d.get('message')}" for d in exc.details
                        if isinstance(d, dict) and str(d.get("message")) not in exc.message]
                _fail(f"{exc.message} ({rows[0]})" if len(rows) == 1 else "\n  ".join([exc.message, *rows]))
            _fail(exc.message, 2 if exc.status == 0 else 1)
        except BrokenPipeError:  # `kiln jobs | head -1`: the reader left; so do we, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)


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


def default_api_workers(database_url: str) -> int:
    """API processes `kiln up` starts: one on SQLite, whose single writer gains nothing from more; on PostgreSQL
    one per core, since one Python process runs on one core at a time (two made status polling 1.3-1.7 times as
    fast on 2 cores, BENCHMARKS.md section 5), at most 4, since each holds up to kiln.db.POOL_SIZE connections."""
    if not database_url.startswith("postgresql"):
        return 1
    return min(usable_cores(), 4)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API binds to.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port the API listens on.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="All state goes here.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(0, 256),
              help="CPU training processes (beside one per GPU).")
@click.option("--gpus", default="auto", show_default=True,
              help="GPUs to train on, one process each, as `kiln worker --gpus`: auto, all, none, or indices like 0,2.")
@click.option("--api-workers", type=click.IntRange(1, 64), default=None,
              help="API processes (uvicorn --workers). Default: 1 on SQLite; on PostgreSQL one per core, at most 4.")
def up(host: str, port: int, data_dir: Path | None, concurrency: int, gpus: str, api_workers: int | None) -> None:
    """Start everything on this machine: broker, database, API, the training workers `kiln worker` would start
    here (one per GPU, and a CPU one) and a predictor."""
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
    from kiln.devices import host_gpus
    from kiln.embedded import EmbeddedRedis, stop_process
    from kiln.launch import choose_gpus, plan

    try:
        chosen = choose_gpus(gpus, host_gpus() if gpus != "none" else [])
    except ValueError as exc:
        _fail(str(exc), 2)
    # What `kiln worker` would start on this host (each GPU's process pinned to it, the CPU one seeing no GPU),
    # and a predictor: predictions have their own process, so long training never delays them.
    tag, hostname = str(os.getpid()), socket.gethostname()
    trainers = plan(settings, role="train", gpus=chosen, concurrency=concurrency, extra_queues=(), host=hostname,
                    tag=tag)
    if not trainers:
        _fail("nothing would train: --concurrency 0 and no GPU chosen", 2)
    workers = [*trainers, *plan(settings, role="predict", gpus=[], concurrency=1, extra_queues=(), host=hostname,
                                tag=tag)]
    try:
        if not settings.broker_url:
            broker = EmbeddedRedis(settings.data_dir / "redis").start()
            os.environ["KILN_BROKER_URL"] = broker.url
        get_settings.cache_clear()
        settings = get_settings()

        from kiln.migrate import upgrade

        upgrade(settings.db_url)
        env = {**os.environ, "KILN_API_KEY": api_key}
        api_workers = api_workers or default_api_workers(settings.db_url)
        api_env = env
        if api_workers > 1:  # /metrics then sums every API process's request latency (api/observability.py)
            metrics_dir = settings.data_dir / "api-metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)  # the previous run's processes are gone
            metrics_dir.mkdir()
            api_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        # Own sessions: Ctrl-C reaches only this process, which then stops the children in order
        # (API first, then the workers, which finish or hand back their jobs, then the broker).
        for process in workers:
            children.append(subprocess.Popen(process.command(), env={**env, **process.env}, start_new_session=True))
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", host,
                 "--port", str(port), "--log-level", "warning", "--workers", str(api_workers)],
                env=api_env, start_new_session=True,
            )
        )
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(url, children, len(workers))
        (settings.data_dir / "server.json").write_text(json.dumps({"url": url}))
        click.echo(
            f"\nkiln is up.\n"
            f"  dashboard: {url}/   (sign in with the API key)\n"
            f"  API:       {url}   (docs: {url}/docs; {api_workers} process{'es' if api_workers > 1 else ''})\n"
            f"  API key:   {api_key}\n"
            f"  data dir:  {settings.data_dir}\n"
            f"  broker:    {settings.broker_url}{'  (embedded)' if broker else ''}\n"
            f"  database:  {settings.db_url}\n"
            f"  workers:   {_workers_line(trainers, chosen)}, a predictor\n\n"
            f"Try:  kiln submit examples/digits.json --follow\n"
            f"Stop: Ctrl-C\n"
        )
        os.wait()  # returns when any child (API, worker, broker) exits; Ctrl-C interrupts it
        _fail("a kiln process exited unexpectedly; see the log above")
    except KeyboardInterrupt:
        click.echo("\nstopping kiln...")
    finally:
        for child in reversed(children):  # the API first, then the workers (which hand their jobs back)
            stop_process(child, 60)
        if broker:
            broker.stop()


def _workers_line(trainers: "list[WorkerProcess]", gpus: list[Gpu]) -> str:
    """The training processes in a line: "GPU 0 (NVIDIA H100 80GB HBM3), 1 CPU training process"."""
    by_uuid = {g.uuid: g for g in gpus}
    parts = []
    for w in trainers:
        if (gpu := by_uuid.get(w.env.get("CUDA_VISIBLE_DEVICES", ""))) is not None:
            parts.append(f"GPU {gpu.index} ({gpu.name})")
        else:
            parts.append(f"{w.concurrency} CPU training process{'es' if w.concurrency > 1 else ''}")
    return ", ".join(parts)


def _wait_ready(url: str, children: list[subprocess.Popen], workers: int) -> None:
    from kiln.embedded import wait_until

    def ready() -> bool:
        if any(child.poll() is not None for child in children):
            _fail("a kiln process failed to start; see the log above")
        try:
            api_ok = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
        from kiln.dispatch import producer

        return api_ok and len(producer().control.ping(timeout=0.5)) >= workers

    wait_until(ready, timeout=120, interval=0.25, what="the API and the workers")


@main.command()
@click.option("--concurrency", "-c", type=click.IntRange(0, 256), default=None,
              help="CPU training processes. Default: KILN_WORKER_CONCURRENCY (1) on a CPU host, none on a GPU host.")
@click.option("--gpus", default="auto", show_default=True,
              help="GPUs to train on, one process each: auto (all the host has), all, none, or indices like 0,2.")
@click.option("--queue", "-Q", "queues", multiple=True, metavar="NAME",
              help="Also take the jobs whose resources.queue is NAME (a pool of particular hosts); repeatable.")
@click.option("--role", type=click.Choice(["train", "predict"]), default="train", show_default=True,
              help="train: run training jobs; predict: answer /predict requests from trained weights.")
def worker(concurrency: int | None, gpus: str, queues: tuple[str, ...], role: str) -> None:
    """Run workers against KILN_BROKER_URL and KILN_DATABASE_URL: one per GPU, and CPU processes."""
    from kiln.devices import host_gpus
    from kiln.launch import choose_gpus, plan, run
    from kiln.spec import check_queue_name

    try:
        for name in queues:
            check_queue_name(name)
        chosen = choose_gpus(gpus, host_gpus() if role == "train" and gpus != "none" else [])
    except ValueError as exc:
        _fail(str(exc), 2)
    processes = plan(get_settings(), role=role, gpus=chosen, concurrency=concurrency, extra_queues=queues,
                     host=socket.gethostname(), tag=str(os.getpid()))
    if not processes:
        _fail("nothing to run: --concurrency 0 and no GPU chosen", 2)
    for p in processes:
        pinned = f" on GPU {p.env['CUDA_VISIBLE_DEVICES']}" if p.env.get("CUDA_VISIBLE_DEVICES") else ""
        click.echo(f"starting {p.name}: {p.concurrency} process(es){pinned}, queues {', '.join(p.queues)}", err=True)
    sys.exit(run(processes))


@main.command("worker-health")
def worker_health() -> None:
    """Exit 0 while a worker on this host keeps its registry row fresh (a container healthcheck)."""
    from kiln.db import session_scope
    from kiln.workers import host_is_serving

    with session_scope() as session:
        if not host_is_serving(session, socket.gethostname(), get_settings().lease_s):
            _fail(f"no worker on {socket.gethostname()} has reported within KILN_LEASE_S", 1)


@main.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    from kiln.migrate import upgrade

    upgrade(get_settings().db_url)
    click.echo("database is up to date")


@main.group()
def keys() -> None:
    """Manage owners' API keys (run where KILN_DATABASE_URL reaches the database)."""


@keys.command("create")
@click.option("--owner", required=True, help="Who the key acts for; their jobs and datasets are theirs alone.")
@click.option("--name", default=None, help="A label to tell the owner's keys apart.")
def keys_create(owner: str, name: str | None) -> None:
    """Create a key and print it, once: only its digest is stored."""
    from kiln.db import get_sessionmaker
    from kiln.keys import check_owner, create_key

    try:
        check_owner(owner)
    except ValueError as exc:
        _fail(str(exc))
    with get_sessionmaker()() as session:
        row, key = create_key(session, owner, name)
        click.echo(f"created key {row.id} for owner {row.owner}; it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@click.option("--owner", default=None, help="Only this owner's keys.")
def keys_list(owner: str | None) -> None:
    """List keys by id (never the keys themselves)."""
    from kiln.db import get_sessionmaker
    from kiln.keys import list_keys

    with get_sessionmaker()() as session:
        for row in list_keys(session, owner):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            click.echo(f"{row.id}  {row.owner:<20}  {row.created_at:%Y-%m-%d %H:%M}  {state:<24}  {row.name or ''}")


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; requests with it are refused from now on."""
    from kiln.db import get_sessionmaker
    from kiln.keys import revoke_key

    with get_sessionmaker()() as session:
        if not revoke_key(session, key_id):
            _fail(f"no active key with id {key_id!r}; `kiln keys list` shows them")
    click.echo(f"revoked key {key_id}")


# ---- using the service ---------------------------------------------------------------------------

url_option = click.option(
    "--url", envvar="KILN_URL", default=None, help="API address (default: KILN_URL, else found from `kiln up`)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (parseable by jq) instead of text.")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; in a spec it means the number."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _load_spec(path: str) -> dict[str, Any]:
    """A spec from a JSON file (.json) or a YAML one (anything else, JSON included); `-` reads stdin."""
    name = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {name}: {exc}", 2)
    as_json = path.endswith(".json")
    try:
        spec = json.loads(text) if as_json else yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader)
    except (ValueError, yaml.YAMLError) as exc:
        _fail(f"{name} is not valid {'JSON' if as_json else 'YAML'}: {' '.join(str(exc).split())}", 2)
    if not isinstance(spec, dict):
        _fail(f"{name} must hold one job spec (a mapping such as {{data: {{dataset: iris}}}})", 2)
    return spec


# --- formatting -------------------------------------------------------------------------------------


def _span(seconds: float) -> str:
    """12s, 3m05s, 42m, 2h05m, 3d4h: as kubectl prints ages."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _parse_time(iso: str) -> datetime:
    when = datetime.fromisoformat(iso)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _age(iso: str | None) -> str:
    return _span((datetime.now(UTC) - _parse_time(iso)).total_seconds()) if iso else "-"


def _when(iso: str | None) -> str:
    """2026-11-21 17:03:00 UTC (5m ago)."""
    if not iso:
        return "-"
    return f"{_parse_time(iso).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({_age(iso)} ago)"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> None:
    """An aligned table, two spaces between columns, headers in capitals (as kubectl and gh print them)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    right = set(right)
    for row in [list(headers), *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        click.echo("  ".join(cells).rstrip())


def _short(dataset: str) -> str:
    """An upload's id (a UUID) shortened for tables; a built-in's name as it is."""
    return dataset[:8] if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f-]{27}", dataset) else dataset


def _status(job: Job) -> str:
    return "cancelling" if job["status"] == "running" and job.get("cancel_requested") else job["status"]


def _score(m: EpochMetrics) -> str:
    if m.get("val_accuracy") is not None:
        return f"val_acc {m['val_accuracy']:.4f}"
    if m.get("val_r2") is not None:
        return f"val_r2 {m['val_r2']:.4f}"
    return ""


def _epoch_line(m: EpochMetrics, epochs: int, eta: float | None = None) -> str:
    parts = [f"epoch {m['epoch']:>{len(str(epochs))}}/{epochs}", f"train_loss {_num(m['train_loss'])}"]
    if m.get("val_loss") is not None:
        parts.append(f"val_loss {_num(m['val_loss'])}")
    if score := _score(m):
        parts.append(score)
    parts.append(f"{m['duration_s']:.2f}s")
    if eta is not None and m["epoch"] < epochs:
        parts.append(f"ETA {_span(eta)}")
    return "  ".join(parts)


def _final_line(job: Job) -> str:
    line = f"job {job['id']} {job['status']}"
    if job.get("error"):
        return f"{line}: {job['error']}"
    return f"{line} ({job['stop_reason']})" if job.get("stop_reason") else line


class Progress:
    """Draws a job as it trains: on a terminal one line redrawn in place (a bar, the epoch, the losses and the
    ETA); elsewhere (a pipe, a file, CI) a plain line per epoch."""

    WIDTH = 20

    def __init__(self, job: Job, out: IO[str], tty: bool) -> None:
        self.job, self.out, self.tty = job, out, tty
        self.epochs: int = job["spec"]["epochs"]
        self.durations: list[float] = []
        self.latest: EpochMetrics | None = job.get("latest_metrics")
        self.attempt = job.get("attempt", 0)
        self.drawn = False
        utf8 = (getattr(out, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self.full, self.empty = ("█", "░") if utf8 else ("#", "-")

    def status(self, job: Job) -> None:
        if job["status"] == "running" and job["attempt"] > max(self.attempt, 1):
            self.note(f"attempt {job['attempt']} on {job['worker'] or 'a worker'}, "
                      f"resuming after epoch {job['checkpoint_epoch']}")
        self.attempt, self.job = job["attempt"], job
        self.latest = job.get("latest_metrics") or self.latest
        if self.tty:
            self.draw()

    def epoch(self, m: EpochMetrics) -> None:
        self.latest = m
        self.durations.append(m["duration_s"])
        # The job seen last says less than this epoch: forget its progress and ETA, count from the epochs.
        job = {k: v for k, v in self.job.items() if k not in ("progress", "eta_seconds")}
        self.job = {**job, "epochs_completed": m["epoch"], "status": "running"}  # type: ignore[typeddict-item]
        if self.tty:
            self.draw()
        else:
            self.out.write(_epoch_line(m, self.epochs, job_eta(self.job, self.durations)) + "\n")
            self.out.flush()

    def end(self, job: Job) -> None:
        self.job = job
        self.latest = job.get("latest_metrics") or self.latest
        if self.tty:
            self.draw()
        self.close()

    def note(self, text: str) -> None:
        self.close()
        self.out.write(text + "\n")

    def close(self) -> None:
        """End the redrawn line, so that whatever is printed next starts on a line of its own."""
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    def line(self, width: int | None = None) -> str:
        """The progress line, fitted to `width` columns by leaving out the least useful parts first."""
        done = job_progress(self.job)
        filled = min(self.WIDTH, int(done * self.WIDTH + 1e-9))
        count = self.job.get("epochs_completed", 0)
        parts: list[tuple[int, str]] = []  # (drop order: higher goes first, 0 never; text)
        if self.job["status"] != "running" or self.job.get("cancel_requested"):
            parts.append((0, f"{_status(self.job)}"))
        parts += [(0, f"epoch {count:>{len(str(self.epochs))}}/{self.epochs}"),
                  (4, self.full * filled + self.empty * (self.WIDTH - filled)), (0, f"{done:>4.0%}")]
        if m := self.latest:
            parts.append((0, f"loss {_num(m['train_loss'])}"))
            if m.get("val_loss") is not None:
                parts.append((2, f"val_loss {_num(m['val_loss'])}"))
            if score := _score(m):
                parts.append((3, score))
        eta = job_eta(self.job, self.durations)
        if eta is not None and self.job["status"] == "running" and count < self.epochs:
            parts.append((1, f"ETA {_span(eta)}"))
        while width and len("  ".join(t for _, t in parts)) > width and max(p for p, _ in parts) > 0:
            parts.remove(max(parts, key=lambda part: part[0]))
        text = "  ".join(t for _, t in parts)
        return text[:width] if width else text

    def draw(self) -> None:
        columns = shutil.get_terminal_size((100, 24)).columns
        self.out.write("\r" + self.line(max(20, columns - 1)) + "\x1b[K")
        self.out.flush()
        self.drawn = True


def _follow(client: Client, job: Job, as_json: bool = False, quiet: bool = False) -> int:
    """Follow a job to its end: a progress bar on a terminal, a line per epoch elsewhere, JSON lines with --json.
    Returns the exit code: 0 when it succeeded, 1 when it failed or was cancelled."""
    out = sys.stdout
    progress = Progress(job, out, out.isatty() and not as_json and not quiet)
    final: Job | None = None
    try:
        for event in client.stream(job["id"]):
            if as_json:
                data = event.metrics if isinstance(event, EpochEvent) else event.job
                click.echo(json.dumps({"event": event.type, "id": event.id, "data": data}))
            if isinstance(event, EndEvent):
                final = event.job
            if as_json or quiet:
                continue
            if isinstance(event, StatusEvent):
                progress.status(event.job)
            elif isinstance(event, EpochEvent):
                progress.epoch(event.metrics)
            else:
                progress.end(event.job)
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"stopped following job {job['id']}; it goes on (`kiln cancel {job['id']}` stops it)", err=True)
        sys.exit(130)
    finally:
        progress.close()
    assert final is not None
    if not as_json and not quiet:
        click.echo(_final_line(final))
    return 0 if final["status"] == "succeeded" else 1


# --- jobs ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--follow", "-f", is_flag=True,
              help="Show the job's progress until it ends; exit 1 if it fails or is cancelled.")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key returns the first job.")
@click.option("--quiet", "-q", is_flag=True, help="Print the job's id only (and nothing while following).")
@json_option
@url_option
def submit(spec_file: str, follow: bool, idempotency_key: str | None, quiet: bool, as_json: bool,
           url: str | None) -> None:
    """Submit a job spec: a YAML or JSON file, or - for stdin.

    \b
      kiln submit examples/digits.json --follow
      kiln submit spec.yaml -q              # prints the id: ID=$(kiln submit spec.yaml -q)
      kiln submit spec.yaml --json | jq -r .id
    """
    spec = _load_spec(spec_file)
    with Client(url) as client:
        job = client.submit(spec, idempotency_key=idempotency_key)
        if quiet:
            click.echo(job["id"])
        elif as_json and not follow:
            _print_json(job)
        elif not as_json:
            click.echo(f"submitted job {job['id']} ({job['status']})")
        if follow:
            sys.exit(_follow(client, job, as_json=as_json, quiet=quiet))


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print each event as a line of JSON instead.")
@url_option
def watch(job_id: str, as_json: bool, url: str | None) -> None:
    """Follow a job until it ends, as `submit --follow` does; exit 1 if it fails or is cancelled."""
    with Client(url) as client:
        sys.exit(_follow(client, client.get(job_id), as_json=as_json))


@main.command()
@click.option("--status", "-s", multiple=True, type=click.Choice(STATUSES), help="Only this status (repeatable).")
@click.option("--name", default=None, help="Only jobs of this name.")
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(1), help="The newest N jobs.")
@click.option("--all", "-A", "all_", is_flag=True, help="Every job, not only the newest --limit.")
@json_option
@url_option
def jobs(status: tuple[str, ...], name: str | None, limit: int, all_: bool, as_json: bool, url: str | None) -> None:
    """List jobs, newest first."""
    with Client(url) as client:
        found = [*client.list(status=status, name=name, limit=None if all_ else limit)]
    if as_json:
        _print_json(found)
        return
    if not found:
        click.echo("no jobs" + (" match" if status or name else " yet; try `kiln submit SPEC`"), err=True)
        return
    rows = []
    for job in found:
        latest = job["latest_metrics"] or {}
        rows.append([
            job["id"], job["name"] or "-", _short(job["spec"]["data"]["dataset"]), _status(job),
            f"{job['epochs_completed']}/{job['spec']['epochs']}", _num(latest.get("train_loss")),
            _num(latest.get("val_loss")), _age(job["created_at"]),
        ])
    _table(["ID", "NAME", "DATASET", "STATUS", "EPOCHS", "LOSS", "VAL_LOSS", "AGE"], rows, right=(4, 5, 6))


def _describe(section: dict[str, Any] | None) -> str:
    """{'type': 'mlp', 'hidden': [64], ...} -> 'mlp  hidden [64]  ...'"""
    if not section:
        return "-"
    rest = "  ".join(f"{k} {v}" for k, v in section.items() if k != "type" and v is not None)
    return f"{section.get('type', '')}  {rest}".strip()


def _resources(resources: dict[str, Any] | None) -> str | None:
    """What a job asked for beyond the default (a CPU, fp32, the default queue); None when nothing."""
    defaults = ResourcesSpec().model_dump()
    asked = {k: v for k, v in (resources or {}).items() if v is not None and v != defaults.get(k)}
    return "  ".join(f"{k} {v}" for k, v in asked.items()) or None


@main.command()
@click.argument("job_id")
@json_option
@url_option
def show(job_id: str, as_json: bool, url: str | None) -> None:
    """Show one job: its status, spec, progress and latest metrics."""
    with Client(url) as client:
        job = client.get(job_id)
    if as_json:
        _print_json(job)
        return
    spec, latest = job["spec"], job["latest_metrics"]
    progress = f"{job['epochs_completed']}/{spec['epochs']} epochs ({job_progress(job):.0%})"
    if (eta := job_eta(job)) is not None and job["status"] == "running":
        progress += f", ETA {_span(eta)}"
    data = spec["data"]
    fields: list[tuple[str, Any]] = [
        ("id", job["id"]), ("name", job["name"] or "-"), ("status", _status(job)),
        ("waiting", job.get("waiting_reason")),  # absent from older servers
        ("error", job["error"]), ("stopped", job["stop_reason"]),
        ("progress", progress),
        ("dataset", f"{data['dataset']}  val_fraction {data['val_fraction']}"
                    + (f"  samples {data['samples']}" if data.get("samples") else "")),
        ("model", _describe(spec["model"])),
        ("loss", spec.get("loss") or "-"),
        ("optimizer", _describe(spec["optimizer"])),
        ("lr search", job["lr_search"] and f"chose lr {_num(job['lr_search'].get('lr'))}"),
        ("scheduler", _describe(spec.get("scheduler")) if (spec.get("scheduler") or {}).get("type") != "none"
         else None),
        ("early stop", spec.get("early_stopping") and "  ".join(f"{k} {v}" for k, v in spec["early_stopping"].items())),
        ("grad clip", spec.get("grad_clip")),
        ("resources", _resources(spec.get("resources"))),
        ("batch size", spec["batch_size"]), ("seed", spec["seed"]),
        ("time limit", spec.get("time_limit_s") and _span(spec["time_limit_s"])),
        ("created", _when(job["created_at"])), ("started", job["started_at"] and _when(job["started_at"])),
    ]
    if job["finished_at"]:
        took = ""
        if job["started_at"]:
            seconds = (_parse_time(job["finished_at"]) - _parse_time(job["started_at"])).total_seconds()
            took = f", took {seconds:.1f}s" if seconds < 60 else f", took {_span(seconds)}"
        fields.append(("finished", _when(job["finished_at"]) + took))
    if job["worker"]:
        fields.append(("worker", f"{job['worker']}  (attempt {job['attempt']})"))
    if latest:
        line = _epoch_line(latest, spec["epochs"])
        fields.append(("latest", line))
    for key, value in fields:
        if value is not None and value != "":
            click.echo(f"{key + ':':<12} {value}")


_METRIC_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("epoch", "EPOCH", str), ("train_loss", "TRAIN_LOSS", _num), ("val_loss", "VAL_LOSS", _num),
    ("train_accuracy", "TRAIN_ACC", _num), ("val_accuracy", "VAL_ACC", _num), ("val_r2", "VAL_R2", _num),
    ("lr", "LR", lambda v: f"{v:.3g}"), ("grad_norm", "GRAD_NORM", lambda v: _num(v, 3)),
    ("duration_s", "TIME", lambda v: f"{v:.2f}s"), ("attempt", "ATTEMPT", str),
]


@main.command()
@click.argument("job_id")
@click.option("--since", default=0, type=click.IntRange(0), help="Only epochs after this one.")
@click.option("--max-points", type=click.IntRange(1), default=None, help="Downsample to at most N rows (server side).")
@json_option
@url_option
def metrics(job_id: str, since: int, max_points: int | None, as_json: bool, url: str | None) -> None:
    """A job's per-epoch metrics, as a table."""
    with Client(url) as client:
        rows = client.metrics(job_id, since=since, max_points=max_points)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no epochs yet" if not since else f"no epochs after {since}", err=True)
        return
    columns = [(key, head, fmt) for key, head, fmt in _METRIC_COLUMNS
               if any(m.get(key) is not None for m in rows) and (key != "attempt" or any(m[key] > 1 for m in rows))]
    _table([head for _, head, _ in columns],
           [[fmt(m[key]) if m.get(key) is not None else "-" for key, _, fmt in columns] for m in rows],
           right=range(len(columns)))


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON array of the lines (with --follow: a JSON string per line).")
@url_option
def logs(job_id: str, follow: bool, as_json: bool, url: str | None) -> None:
    """A job's training log."""
    with Client(url) as client:
        if not follow:
            lines = client.logs(job_id).splitlines()
            if as_json:
                _print_json(lines)
            else:
                for line in lines:
                    click.echo(line)
            return
        # Each read asks only for the epochs after those the job had committed before the previous read (so all of
        # them were in it), not the whole log again; a line is printed once, whenever it first appears.
        printed: set[str] = set()
        after_epoch = 0
        try:
            while True:
                job = client.get(job_id)  # first, so no line written before the end is lost
                for line in client.logs(job_id, after_epoch).splitlines():
                    if line not in printed:
                        printed.add(line)
                        click.echo(json.dumps(line) if as_json else line)
                if job["status"] in TERMINAL:
                    return
                after_epoch = job["epochs_completed"]
                time.sleep(1.0)
        except KeyboardInterrupt:
            sys.exit(130)


@main.command()
@click.argument("job_id")
@json_option
@url_option
def history(job_id: str, as_json: bool, url: str | None) -> None:
    """What happened to a job: queued, claimed by which worker, lost, resumed, finished."""
    with Client(url) as client:
        events = client.history(job_id)
    if as_json:
        _print_json(events)
        return
    _table(["TIME", "KIND", "ATTEMPT", "MESSAGE"],
           [[f"{_parse_time(e['at']).astimezone(UTC):%Y-%m-%d %H:%M:%S}", e["kind"], str(e["attempt"]), e["message"]]
            for e in events])


@main.command()
@click.argument("job_id")
@json_option
@url_option
def cancel(job_id: str, as_json: bool, url: str | None) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next batch."""
    with Client(url) as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job)
    elif job["status"] == "running":
        click.echo(f"job {job_id} is stopping (it ends at its next batch)")
    else:
        click.echo(f"job {job_id} {job['status']}")


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="A file, or a directory (default: JOB_ID.safetensors here).")
@click.option("--part", type=click.Choice(["encoder"]), default=None, help="An autoencoder's encoder alone.")
@url_option
def download(job_id: str, output: Path | None, part: str | None, url: str | None) -> None:
    """Download a succeeded job's weights (safetensors, sha256 checked)."""
    default = f"{job_id}{'-' + part if part else ''}.safetensors"
    target = output / default if output and output.is_dir() else output or Path(default)
    with Client(url) as client:
        path = client.download(job_id, target, part=part)  # type: ignore[arg-type]
    click.echo(f"saved {path} ({path.stat().st_size} bytes)")


def _read_rows(source: str) -> list[Any]:
    """Rows for predict: JSON text, a .json or .csv file (a header row is skipped), or - for stdin."""
    if source == "-":
        text, csv_file = sys.stdin.read(), False
    elif Path(source).is_file():
        text, csv_file = Path(source).read_text(), source.endswith(".csv")
    else:
        text, csv_file = source, False
    if csv_file:
        rows = [line.split(",") for line in text.splitlines() if line.strip()]
        try:
            float(rows[0][0])
        except (ValueError, IndexError):
            rows = rows[1:]
        try:
            return [[float(cell) for cell in row] for row in rows]
        except ValueError as exc:
            _fail(f"{source}: every cell must be a number ({exc})", 2)
    try:
        rows = json.loads(text)
    except ValueError as exc:
        _fail(f"inputs must be JSON rows such as [[5.1, 3.5, 1.4, 0.2]]: {exc}", 2)
    if not isinstance(rows, list):
        _fail("inputs must be a JSON list of rows, such as [[5.1, 3.5, 1.4, 0.2]]", 2)
    return rows


@main.command()
@click.argument("job_id")
@click.argument("inputs", default="-")
@json_option
@url_option
def predict(job_id: str, inputs: str, as_json: bool, url: str | None) -> None:
    """Predict with a succeeded job: INPUTS is JSON rows, a .json or .csv file, or - (stdin, the default).

    \b
      kiln predict JOB '[[5.1, 3.5, 1.4, 0.2]]'
      kiln predict JOB rows.csv --json | jq '.predictions'
    """
    rows = _read_rows(inputs)
    with Client(url) as client:
        answer = client.predict(job_id, rows)
    if as_json:
        _print_json(answer)
        return
    probabilities = answer.get("probabilities")
    headers = ["ROW", "PREDICTION"] + (["PROBABILITY"] if probabilities else [])
    table = []
    for i, prediction in enumerate(answer["predictions"]):
        shown = json.dumps(prediction) if isinstance(prediction, list) else _num(prediction)
        table.append([str(i), shown] + ([f"{max(probabilities[i]):.4f}"] if probabilities else []))
    numeric = not any(isinstance(p, list) for p in answer["predictions"])
    _table(headers, table, right=(0, 1, 2) if numeric else (0, 2))


# --- datasets -----------------------------------------------------------------------------------------


@main.group()
def datasets() -> None:
    """Upload and list datasets to train on."""


@datasets.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", "-t", default=None, help="The CSV column to learn (CSV files).")
@click.option("--name", default=None, help="Default: the file's name without its extension.")
@click.option("--task", type=click.Choice(["auto", "classification", "binary", "regression"]), default="auto",
              show_default=True,
              help="auto: from the targets (2 integer values: binary, 3..50: classification, else regression).")
@click.option("--quiet", "-q", is_flag=True, help="Print the dataset's id only.")
@json_option
@url_option
def datasets_upload(file: Path, target: str | None, name: str | None, task: str, quiet: bool, as_json: bool,
                    url: str | None) -> None:
    """Upload a CSV (a header row; --target names the column to learn) or an NPZ (arrays x and y)."""
    with Client(url) as client:
        ds = client.datasets.upload(file, target=target, name=name, task=task)  # type: ignore[arg-type]
    if as_json:
        _print_json(ds)
    elif quiet:
        click.echo(ds["id"])
    else:
        classes = f", {ds['classes']} classes" if ds.get("classes") else ""
        click.echo(f"uploaded dataset {ds['id']} ({ds['name']}): {ds['task']}, {ds['rows']} rows, "
                   f"{ds['features']} features{classes}")
        click.echo(f"train on it with:  data: {{dataset: {ds['id']}}}")


@datasets.command("list")
@json_option
@url_option
def datasets_list(as_json: bool, url: str | None) -> None:
    """Your uploaded datasets, newest first."""
    with Client(url) as client:
        found = [*client.datasets.list()]
    if as_json:
        _print_json(found)
        return
    if not found:
        click.echo("no datasets yet; try `kiln datasets upload FILE --target COLUMN`", err=True)
        return
    _table(["ID", "NAME", "TASK", "ROWS", "FEATURES", "CLASSES", "AGE"],
           [[d["id"], d["name"], d["task"], str(d["rows"]), str(d["features"]),
             str(d["classes"]) if d["classes"] is not None else "-", _age(d["created_at"])] for d in found],
           right=(3, 4, 5))


@datasets.command("show")
@click.argument("dataset_id")
@json_option
@url_option
def datasets_show(dataset_id: str, as_json: bool, url: str | None) -> None:
    """One uploaded dataset."""
    with Client(url) as client:
        ds = client.datasets.get(dataset_id)
    if as_json:
        _print_json(ds)
        return
    for key in ("id", "name", "task", "rows", "features", "classes", "labels"):
        if ds.get(key) is not None:
            click.echo(f"{key + ':':<10} {ds[key]}")
    click.echo(f"{'created:':<10} {_when(ds['created_at'])}")


if __name__ == "__main__":
    main()
