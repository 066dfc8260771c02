"""Submit-to-start latency: from the moment POST /v1/jobs returns to the moment the worker's training loop begins,
with a warm worker, beside bare Celery's publish-to-start latency measured in the same run.

    .venv/bin/python -m bench.latency [--jobs 200] [--database-url ...] [--broker-url ...]

The stack: a throwaway PostgreSQL database, Redis, the API (one uvicorn process) and two worker processes on
kiln's worker command line (prefork, concurrency 1): one for kiln's queue, one for the bare-Celery queue. Both run
bench.probe (kiln's worker app plus timestamps). One at a time, alternating, the benchmark

- submits a job ({"data": {"dataset": "iris"}, "epochs": 1}) and takes time.time() when the 201 has been read;
  the worker takes time.time() when fit() is entered (after the claim, the dataset load and the model build).
  The difference is the latency. The job then runs to its end, and the worker is left idle for 20 ms;
- sends `bench.bare` (a task that only takes time.time()) with send_task on the same Celery configuration and
  takes time.time() when send_task has returned; the difference to the task's start is bare Celery's latency.

Both clocks are this machine's. POST returns after kiln has published the message, so a worker can begin before
the client has read the answer: such a latency is negative, and counted as it is.
"""

import argparse
import json
import sys
import time
import uuid
from collections import defaultdict

from bench import stack as bench_stack
from bench.report import heading, machine, percentile, target
from kiln.dispatch import make_celery

SPEC = {"data": {"dataset": "iris"}, "epochs": 1}
IDLE_S = 0.02  # between one measurement and the next, so each message finds an idle worker


class Probe:
    """The records bench.probe pushes onto its Redis list, read with BLPOP, by key (job id) and kind."""

    def __init__(self, stack: bench_stack.Stack) -> None:
        self.redis = stack.redis()
        self.key = stack.probe_key
        self.records: dict[str, dict[str, dict]] = defaultdict(dict)

    def wait(self, key: str, kind: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while kind not in self.records[key]:
            left = deadline - time.monotonic()
            item = self.redis.blpop([self.key], timeout=max(1, int(left))) if left > 0 else None
            if item is None:
                raise TimeoutError(f"no {kind} record for {key} within {timeout} s")
            entry = json.loads(item[1])
            self.records[entry["key"]][entry["kind"]] = entry
        return self.records[key][kind]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


def summary(label: str, values: list[float]) -> None:
    print(f"  {label:<44} p50 {ms(percentile(values, 50))}  p95 {ms(percentile(values, 95))}  "
          f"p99 {ms(percentile(values, 99))}  max {ms(max(values))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="measured jobs (and as many bare tasks)")
    parser.add_argument("--warmup", type=int, default=5, help="jobs and bare tasks first, not counted")
    bench_stack.add_arguments(parser)
    args = parser.parse_args()

    print(f"Submit-to-start latency: {machine()}; PostgreSQL, Redis, API and two worker processes on this machine; "
          f"{args.jobs} jobs and {args.jobs} bare tasks, alternating, one at a time")
    with bench_stack.running(args) as stack:
        stack.start_worker("worker", 1)
        bare_queue = f"{stack.settings.queue}.bare"
        stack.start_worker("bare", 1, queue=bare_queue)
        stack.wait_for_workers()
        probe = Probe(stack)
        celery = make_celery(stack.settings)
        kiln: dict[str, list[float]] = defaultdict(list)
        bare: list[float] = []
        first_job: float | None = None
        with stack.client() as http:
            for i in range(args.warmup + args.jobs):
                t0 = time.time()
                response = http.post("/v1/jobs", json=SPEC)
                returned = time.time()
                response.raise_for_status()
                job_id = response.json()["id"]
                started = probe.wait(job_id, "fit_start")["at"]
                claimed = probe.records[job_id]["claimed"]["at"]
                probe.wait(job_id, "done")
                if i == 0:
                    first_job = started - returned
                if i >= args.warmup:
                    kiln["latency"].append(started - returned)
                    kiln["post"].append(returned - t0)
                    kiln["claim"].append(claimed - returned)
                    kiln["prepare"].append(started - claimed)
                time.sleep(IDLE_S)

                key = uuid.uuid4().hex
                celery.send_task("bench.bare", args=[key], queue=bare_queue)
                sent = time.time()
                began = probe.wait(key, "bare_start")["at"]
                if i >= args.warmup:
                    bare.append(began - sent)
                time.sleep(IDLE_S)
        celery.close()

    heading(f"kiln: {args.jobs} jobs, warm worker")
    summary("POST returned -> training loop began", kiln["latency"])
    summary("  of which: POST returned -> claim committed", kiln["claim"])
    summary("  of which: claim committed -> loop began", kiln["prepare"])
    summary("(the POST itself, as the client waited)", kiln["post"])
    print(f"  the very first job of the worker (before warm-up): {ms(first_job)}")
    heading(f"bare Celery: {args.jobs} no-op tasks, same broker, configuration and worker command line")
    summary("send_task returned -> task began", bare)
    heading("ratio")
    p50, p95 = percentile(kiln["latency"], 50), percentile(kiln["latency"], 95)
    b50, b95 = percentile(bare, 50), percentile(bare, 95)
    print(f"  kiln p50 / bare p50 = {p50 / b50:.2f}; kiln p95 / bare p95 = {p95 / b95:.2f}")
    ok = target("p50", ms(p50).strip(), "<= 20 ms", p50 <= 0.020)
    ok &= target("p95", ms(p95).strip(), "<= 60 ms", p95 <= 0.060)
    ok &= target("jobs measured", str(len(kiln["latency"])), ">= 200", len(kiln["latency"]) >= 200)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
