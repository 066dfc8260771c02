"""Tiny-job throughput end to end: 1,000 one-epoch jobs through the API, two worker processes, beside bare
Celery's throughput of no-op tasks on the same broker and worker command line, measured in the same run.

    .venv/bin/python -m bench.throughput [--jobs 1000] [--concurrency 2] [--database-url ...] [--broker-url ...]

First the baseline: a worker with `--concurrency 2` running `bench.bare` (a task that only records when it began),
fed 1,000 send_task calls; its rate is tasks/s from the first send to the last start. Then kiln: the API (one
uvicorn process) and a worker with `--concurrency 2` (kiln's worker app, unchanged), fed 1,000 POST /v1/jobs of
{"data": {"dataset": "iris"}, "epochs": 1} from 4 client threads; its rate is jobs/s from the first POST to the
last job in a final state, read from the database. Sustained: the rate between the 10th and the 90th percentile
of completions, which leaves out the start and the drain. Lost: jobs that did not succeed. KILN_MAX_ACTIVE_JOBS
is raised above the job count for the run, so that the per-owner bound on queued and running jobs (20 by default)
lets the burst in.

The CPU time each process spent (psutil, children included) is printed per job, which says where a job's cost
lies on this 2-core machine. PostgreSQL's figure counts every backend on the server, including other users'.
"""

import argparse
import concurrent.futures
import json
import sys
import threading
import time
import uuid

import psutil
from sqlalchemy import text

from bench import stack as bench_stack
from bench.report import cpu_seconds, heading, machine, percentile, postgres_cpu, target
from kiln.dispatch import make_celery

SPEC = {"data": {"dataset": "iris"}, "epochs": 1}
CLIENTS = 4


class CpuMeter:
    def __init__(self, stack: bench_stack.Stack, names: list[str]) -> None:
        self.processes = {name: psutil.Process(stack.processes[name].pid) for name in names}
        self.me = psutil.Process()
        self.start = self.read()

    def read(self) -> dict[str, float]:
        figures = {name: cpu_seconds(p) for name, p in self.processes.items()}
        figures["postgres (whole server)"] = postgres_cpu()
        figures["benchmark client"] = sum(self.me.cpu_times()[:2])
        return figures

    def per_item(self, count: int) -> dict[str, float]:
        end = self.read()
        return {name: (end[name] - self.start[name]) / count for name in end}


def show_cpu(per_item: dict[str, float], unit: str) -> None:
    for name, seconds in per_item.items():
        print(f"  CPU per {unit}: {name:<24} {seconds * 1000:6.2f} ms")


def sustained(done_at: list[float]) -> float:
    """Completions per second between the 10th and the 90th percentile of completion times."""
    done_at = sorted(done_at)
    low, high = percentile(done_at, 10), percentile(done_at, 90)
    inside = sum(1 for t in done_at if low <= t <= high)
    return (inside - 1) / (high - low) if high > low else float("nan")


def bare_run(stack: bench_stack.Stack, count: int, concurrency: int) -> tuple[float, float]:
    queue = f"{stack.settings.queue}.bare"
    stack.start_worker("bare", concurrency, queue=queue)
    stack.wait_for_workers()
    meter = CpuMeter(stack, ["bare"])
    celery = make_celery(stack.settings)
    r = stack.redis()
    t0 = time.time()
    for _ in range(count):
        celery.send_task("bench.bare", args=[uuid.uuid4().hex], queue=queue)
    deadline = time.monotonic() + 120
    while r.llen(stack.probe_key) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    starts = [json.loads(raw)["at"] for raw in r.lrange(stack.probe_key, 0, -1)]
    r.delete(stack.probe_key)
    celery.close()
    per_task = meter.per_item(count)
    stack.stop("bare")
    rate = len(starts) / (max(starts) - t0)
    heading(f"bare Celery: {count} no-op tasks, worker --concurrency {concurrency}")
    print(f"  {len(starts)} of {count} began; {rate:,.0f} tasks/s from the first send to the last start; "
          f"sustained (10th-90th percentile) {sustained(starts):,.0f} tasks/s")
    show_cpu(per_task, "task")
    return rate, sustained(starts)


def kiln_run(stack: bench_stack.Stack, count: int, concurrency: int) -> tuple[float, float, int]:
    stack.start_worker("worker", concurrency, app="worker.celery_app")
    stack.wait_for_workers()
    meter = CpuMeter(stack, ["api", "worker"])
    engine = stack.engine()
    ids: list[str] = []
    post_times: list[float] = []
    lock = threading.Lock()
    per_client = [count // CLIENTS + (1 if i < count % CLIENTS else 0) for i in range(CLIENTS)]

    def submit(n: int) -> None:
        with stack.client() as http:
            for _ in range(n):
                t = time.perf_counter()
                response = http.post("/v1/jobs", json=SPEC)
                response.raise_for_status()
                with lock:
                    post_times.append(time.perf_counter() - t)
                    ids.append(response.json()["id"])

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        submitted = list(pool.map(submit, per_client))
    assert len(submitted) == CLIENTS
    submit_s = time.time() - t0

    # Wait for every job to reach a final state; give up after 60 s without progress.
    finished, last_change, last_count = 0, time.monotonic(), -1
    while finished < count and time.monotonic() - last_change < 60:
        time.sleep(0.2)
        with engine.connect() as conn:
            finished = conn.execute(text(
                "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')")).scalar_one()
        if finished != last_count:
            last_change, last_count = time.monotonic(), finished
    per_job = meter.per_item(count)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, extract(epoch FROM finished_at), "
                                 "extract(epoch FROM finished_at - started_at) FROM jobs")).all()
    engine.dispose()
    statuses: dict[str, int] = {}
    for status, _, _ in rows:
        statuses[status] = statuses.get(status, 0) + 1
    done_at = [float(at) for status, at, _ in rows if status == "succeeded"]
    run_times = [float(s) for status, _, s in rows if status == "succeeded"]
    succeeded = statuses.get("succeeded", 0)
    rate = succeeded / (max(done_at) - t0) if done_at else 0.0
    heading(f"kiln: {count} one-epoch jobs through the API, worker --concurrency {concurrency}")
    print(f"  submitted in {submit_s:.1f} s ({count / submit_s:,.0f} POST/s; POST p50 "
          f"{percentile(post_times, 50) * 1000:.1f} ms, p95 {percentile(post_times, 95) * 1000:.1f} ms)")
    print(f"  final states: {statuses}; {rate:,.1f} jobs/s from the first POST to the last finish; "
          f"sustained (10th-90th percentile) {sustained(done_at):,.1f} jobs/s")
    print(f"  one job in the worker (claim to finish): p50 {percentile(run_times, 50) * 1000:.1f} ms, "
          f"p95 {percentile(run_times, 95) * 1000:.1f} ms")
    show_cpu(per_job, "job")
    return rate, sustained(done_at), count - succeeded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    bench_stack.add_arguments(parser)
    args = parser.parse_args()
    print(f"Tiny-job throughput: {machine()}; PostgreSQL, Redis, the API, the worker and this client share it")
    # The per-owner bound on queued and running jobs (20 by default) would refuse most of a 1,000-job burst.
    with bench_stack.running(args, extra_env={"KILN_MAX_ACTIVE_JOBS": str(args.jobs + 100)}) as stack:
        bare_rate, bare_sustained = bare_run(stack, args.jobs, args.concurrency)
        rate, kiln_sustained, lost = kiln_run(stack, args.jobs, args.concurrency)
    heading("ratio")
    print(f"  kiln / bare Celery (sustained): {kiln_sustained / bare_sustained:.3f} "
          f"({kiln_sustained:,.1f} jobs/s against {bare_sustained:,.0f} tasks/s)")
    ok = target("sustained jobs/s", f"{kiln_sustained:.1f}", ">= 30", kiln_sustained >= 30)
    ok &= target("overall jobs/s", f"{rate:.1f}", ">= 30", rate >= 30)
    ok &= target("lost jobs", str(lost), "0", lost == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
