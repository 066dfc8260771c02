"""Status polling: GET /v1/jobs/{id} under 64 concurrent connections (wrk), beside GET /healthz from the same
server in the same run; and GET /v1/jobs/{id}/metrics for a job with 10,000 epochs.

    .venv/bin/python -m bench.polling [--duration 10] [--connections 64] [--rounds 3] [--api-workers N]
                                      [--database-url ...]

The stack: a throwaway PostgreSQL database, Redis and the API (uvicorn with as many processes as `kiln up` starts on
PostgreSQL here, kiln.cli.default_api_workers, unless --api-workers), no worker. Three jobs are submitted through
the API. Two are then given, directly in the database, a finished history: one succeeded after 10 epochs (the job
polled), one after 10,000 epochs (the metrics read). The third stays queued (no worker runs here), and is polled
too: a queued job's answer says why it waits, which reads the worker registry. Polling uses wrk (Debian's `wrk`
package: `apt-get install wrk`) with 2 threads, 64 connections and --latency; without wrk on PATH that part is
skipped and says so. The baseline is /healthz on the same server: no database, no key, the cheapest answer the
framework gives; the ratio says how much of the server's capacity a job read costs. wrk runs on the same cores as
the API and PostgreSQL. They alternate (/healthz, the succeeded job, the queued job), --rounds times, and the
targets are checked on the medians of each. Each run also prints the CPU time the API's processes and PostgreSQL
spent per request meanwhile (psutil; PostgreSQL's whole server).

The metrics reads are timed from this client, sequentially: the first read of fresh 10,000-epoch histories (no API
process has read them; each epoch's JSON was rendered when it was written, as a worker does), the same history read
again, a history that gains one epoch before each read (a job being polled while it trains), the history downsampled
with ?max_points=1000, and, as the baseline, the 10-epoch job's. Each series but the first starts after two untimed
reads.
"""

import argparse
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import httpx
import psutil
from sqlalchemy import func, insert, select, update

from bench import stack as bench_stack
from bench.report import cpu_seconds, heading, machine, median, percentile, postgres_cpu, target
from kiln.cli import default_api_workers
from kiln.epochs import render_epoch
from kiln.tables import EpochMetric, Job, JobStatus

SPEC = {"data": {"dataset": "digits"}, "model": {"type": "mlp", "hidden": [64, 32]}, "epochs": 10}
LAYERS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def epoch_row(job_id: str, epoch: int, epochs: int, now: datetime) -> dict:
    """Epoch `epoch` of a job of `epochs`, as the worker writes the row (its JSON rendered with it)."""
    row = {"job_id": job_id, "epoch": epoch, "attempt": 1, "train_loss": 2.3 / epoch, "val_loss": 2.4 / epoch,
           "val_accuracy": min(0.99, 0.1 + epoch / epochs), "lr": 1e-3, "duration_s": 0.031, "samples_per_s": 46000.0,
           "grad_norm": 1.0 / epoch, "grad_norm_per_layer": {name: 0.5 / epoch for name in LAYERS},
           "train_accuracy": min(0.99, 0.1 + epoch / epochs), "val_r2": None, "created_at": now}
    return row | {"rendered": render_epoch(row)}


def finish(stack: bench_stack.Stack, job_id: str, epochs: int) -> None:
    """Give a submitted job the history of one that succeeded after `epochs` epochs."""
    now = datetime.now(UTC)
    rows = [epoch_row(job_id, e, epochs, now) for e in range(1, epochs + 1)]
    engine = stack.engine()
    with engine.begin() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(insert(EpochMetric), rows[start : start + 2000])
        conn.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.succeeded, attempt=1, epochs_completed=epochs, checkpoint_epoch=epochs,
            started_at=now, finished_at=now, worker="bench", published_at=now))
    engine.dispose()


def add_epoch(stack: bench_stack.Stack, job_id: str) -> None:
    """One more epoch in a job's history, as a worker commits it."""
    engine = stack.engine()
    with engine.begin() as conn:
        last = conn.scalar(select(func.max(EpochMetric.epoch)).where(EpochMetric.job_id == job_id))
        conn.execute(insert(EpochMetric), [epoch_row(job_id, last + 1, last + 1, datetime.now(UTC))])
        conn.execute(update(Job).where(Job.id == job_id).values(epochs_completed=last + 1))
    engine.dispose()


def wrk(url: str, path: str, api_key: str | None, connections: int, duration: int) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", f"{url}{path}"]
    if api_key:
        cmd[1:1] = ["-H", f"Authorization: Bearer {api_key}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
               "requests": float(re.search(r"(\d+) requests in", out).group(1))}
    for p in ("50", "75", "90", "99"):
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out).groups()
        figures[f"p{p}"] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non2xx"] = float(errors.group(1)) if errors else 0.0
    socket_errors = re.search(r"Socket errors: (.*)", out)
    figures["socket_errors"] = socket_errors.group(1) if socket_errors else "none"
    return figures


def wrk_with_cpu(stack: bench_stack.Stack, path: str, api_key: str | None, connections: int, duration: int) -> dict:
    """wrk's figures, with the CPU the API's processes and PostgreSQL's spent per request meanwhile (psutil)."""
    api = psutil.Process(stack.processes["api"].pid)
    api_before, pg_before = cpu_seconds(api), postgres_cpu()
    figures = wrk(stack.url, path, api_key, connections, duration)
    return figures | {"api_us": (cpu_seconds(api) - api_before) / figures["requests"] * 1e6,
                      "pg_us": (postgres_cpu() - pg_before) / figures["requests"] * 1e6}


def medians(runs: list[dict]) -> dict:
    """Each figure's median over the runs (errors: the most any run had)."""
    keys = ("rps", "p50", "p75", "p90", "p99", "api_us", "pg_us")
    figures = {key: median([run[key] for run in runs]) for key in keys}
    return figures | {"non2xx": max(run["non2xx"] for run in runs),
                      "socket_errors": "; ".join(sorted({run["socket_errors"] for run in runs}))}


def show(label: str, f: dict) -> None:
    print(f"  {label:<42} {f['rps']:8,.0f} req/s   p50 {f['p50']:6.2f} ms  p90 {f['p90']:6.2f} ms  "
          f"p99 {f['p99']:6.2f} ms   CPU per request: API {f['api_us']:5.0f} us, PostgreSQL {f['pg_us']:4.0f} us   "
          f"non-2xx {f['non2xx']:.0f}, socket errors: {f['socket_errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs of each path, alternating")
    parser.add_argument("--api-workers", type=int, default=None,
                        help="uvicorn worker processes (default: what `kiln up` starts on PostgreSQL here)")
    parser.add_argument("--reads", type=int, default=20, help="timed metrics reads")
    bench_stack.add_arguments(parser)
    args = parser.parse_args()
    args.api_workers = args.api_workers or default_api_workers(args.database_url)
    print(f"Status polling: {machine()}; PostgreSQL, the API ({args.api_workers} uvicorn process(es)) and the load "
          "generator on this machine")
    ok = True
    with bench_stack.running(args, api_workers=args.api_workers) as stack, stack.client() as http:
        polled = http.post("/v1/jobs", json=SPEC).json()["id"]
        long = http.post("/v1/jobs", json=SPEC | {"epochs": 10_000}).json()["id"]
        queued = http.post("/v1/jobs", json=SPEC).json()["id"]
        finish(stack, polled, 10)
        finish(stack, long, 10_000)
        assert http.get(f"/v1/jobs/{polled}").json()["latest_metrics"]["epoch"] == 10
        assert http.get(f"/v1/jobs/{queued}").json()["waiting_reason"].startswith("no live worker")

        heading(f"GET /v1/jobs/{{id}}: wrk, 2 threads, {args.connections} connections, {args.duration} s each, "
                f"{args.rounds} rounds")
        if shutil.which("wrk") is None:
            print("  wrk is not on PATH (Debian: apt-get install wrk): polling not measured")
            ok = False
        else:
            paths = {"GET /healthz (baseline)": ("/healthz", None),
                     "GET /v1/jobs/{id}, succeeded": (f"/v1/jobs/{polled}", stack.api_key),
                     "GET /v1/jobs/{id}, queued": (f"/v1/jobs/{queued}", stack.api_key)}
            for path, key in paths.values():  # every process warmed up on every path
                wrk(stack.url, path, key, args.connections, 2)
            runs: dict[str, list[dict]] = {label: [] for label in paths}
            for i in range(args.rounds):
                for label, (path, key) in paths.items():
                    runs[label].append(wrk_with_cpu(stack, path, key, args.connections, args.duration))
                    show(f"round {i + 1}: {label}", runs[label][-1])
            health, *jobs = (medians(series) for series in runs.values())
            for label, figures in zip(paths, (health, *jobs), strict=True):
                show(f"median: {label}", figures)
            for label, job in zip(list(paths)[1:], jobs, strict=True):
                print(f"  ratio {label} / GET /healthz throughput: {job['rps'] / health['rps']:.2f}")
                ok &= target(f"{label} throughput", f"{job['rps']:,.0f} req/s", ">= 1,500 req/s",
                             job["rps"] >= 1500)
                ok &= target(f"{label} p99", f"{job['p99']:.1f} ms", "<= 50 ms", job["p99"] <= 50)
                ok &= target(f"{label} errors", f"{job['non2xx']:.0f}", "0", job["non2xx"] == 0)

        heading(f"GET /v1/jobs/{{id}}/metrics for a job with 10,000 epochs: {args.reads} sequential reads each")

        def timed(path: str, params: dict | None = None, before=None) -> tuple[float, httpx.Response]:
            if before:
                before()
            t0 = time.perf_counter()
            response = http.get(path, params=params)
            elapsed = time.perf_counter() - t0
            response.raise_for_status()
            return elapsed, response

        def series(path: str, params: dict | None = None, before=None) -> tuple[list[float], httpx.Response]:
            runs = [timed(path, params, before) for _ in range(args.reads + 2)][2:]  # two untimed reads first
            return [t for t, _ in runs], runs[-1][1]

        def show_times(label: str, times: list[float]) -> float:
            p50 = percentile(times, 50)
            print(f"  {label:<58} p50 {p50 * 1000:6.1f} ms, p95 {percentile(times, 95) * 1000:6.1f} ms, "
                  f"max {max(times) * 1000:6.1f} ms")
            return p50

        # Cold: the first read of a history no API process has read yet (fresh jobs, read once each).
        cold = []
        for _ in range(args.reads):
            fresh = http.post("/v1/jobs", json=SPEC | {"epochs": 10_000}).json()["id"]
            finish(stack, fresh, 10_000)
            cold.append(timed(f"/v1/jobs/{fresh}/metrics")[0])
        warm, response = series(f"/v1/jobs/{long}/metrics")
        epochs, size = len(response.json()["epochs"]), len(response.content)
        # Running: each read follows one new epoch, as when a client polls a job that is training.
        growing = http.post("/v1/jobs", json=SPEC | {"epochs": 10_000}).json()["id"]
        finish(stack, growing, 10_000)
        running, _ = series(f"/v1/jobs/{growing}/metrics", before=lambda: add_epoch(stack, growing))
        sampled, _ = series(f"/v1/jobs/{long}/metrics", {"max_points": 1000})
        short, _ = series(f"/v1/jobs/{polled}/metrics")
        print(f"  {epochs:,} epochs, {size / 1e6:.1f} MB of JSON")
        first = show_times("first read in a process (the database joins the epochs' JSON)", cold)
        p50 = show_times("read again (served from the process)", warm)
        show_times("running: one new epoch before each read", running)
        show_times("?max_points=1000 (chosen by the database)", sampled)
        baseline = show_times("the same route for the 10-epoch job (baseline)", short)
        print(f"  ratio 10,000 epochs / 10 epochs: first read {percentile(cold, 50) / baseline:.0f}, "
              f"read again {p50 / baseline:.0f}, running {percentile(running, 50) / baseline:.0f}")
        ok &= target("metrics of 10,000 epochs, p50 first read", f"{first * 1000:.1f} ms", "<= 50 ms", first <= 0.050)
        ok &= target("metrics of 10,000 epochs, p50 read again", f"{p50 * 1000:.1f} ms", "<= 50 ms", p50 <= 0.050)
        ok &= target("metrics of 10,000 epochs, p50 running", f"{percentile(running, 50) * 1000:.1f} ms",
                     "<= 50 ms", percentile(running, 50) <= 0.050)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
