"""Worker start-up: torch and the model code are imported once per worker, not per job, and each pool process
gets its share of the cores in torch threads.

    .venv/bin/python -m bench.startup [--concurrency 2] [--rounds 4] [--database-url ...] [--broker-url ...]

1. Imports, in fresh Python processes: the time to import what a worker's main process imports (worker.tasks), and
   then the first and the second tiny job (prepare + fit of {"data": {"dataset": "iris"}, "epochs": 1}), once
   without and once with the modules a job would otherwise import on its first run (torch._dynamo, which
   torch.optim imports on an optimizer's first use, and scikit-learn's dataset loaders) imported beforehand, as
   worker.celery_app now does in the main process before the pool forks. The second job is the baseline.
2. A live worker (`--concurrency 2`, bench.probe): how long until it answers a ping; then `rounds` rounds of as
   many simultaneous jobs as it has pool processes. Per pool process: its torch threads, the modules it imported
   while running its first job, and its first job beside its later ones (claim to the end of the job).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from bench import stack as bench_stack
from bench.latency import Probe
from bench.report import heading, machine, median, target
from kiln.devices import usable_cores

SPEC = {"data": {"dataset": "iris"}, "epochs": 1}

FIRST_JOBS = """
import json, sys, time
t0 = time.perf_counter()
import worker.tasks
imported = time.perf_counter() - t0
if sys.argv[1] == "preloaded":
    t0 = time.perf_counter()
    import sklearn.datasets, torch._dynamo
    preload = time.perf_counter() - t0
else:
    preload = 0.0
import torch
torch.set_num_threads(1)
from kiln.spec import JobSpec
from worker.preparation import prepare
from worker.training import fit
spec = JobSpec.model_validate(json.loads(sys.argv[2]))
jobs = []
for _ in range(2):
    before = len(sys.modules)
    t0 = time.perf_counter()
    job = prepare(spec)
    fit(job.model, job.data, spec)
    jobs.append({"s": time.perf_counter() - t0, "modules": len(sys.modules) - before})
print(json.dumps({"import": imported, "preload": preload, "jobs": jobs}))
"""


def first_jobs(variant: str) -> dict:
    env = {**os.environ, "KILN_BROKER_URL": os.environ.get("KILN_BROKER_URL", "redis://127.0.0.1:1/0"),
           "PYTHONPATH": str(bench_stack.ROOT)}
    out = subprocess.run([sys.executable, "-c", FIRST_JOBS, variant, json.dumps(SPEC)], capture_output=True,
                         text=True, check=True, env=env, cwd=bench_stack.ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def imports() -> None:
    heading("1. imports, in fresh Python processes (one torch thread)")
    for variant, label in (("plain", "worker.tasks only (as before)"),
                           ("preloaded", "worker.tasks + preloaded modules (now)")):
        f = first_jobs(variant)
        first, second = f["jobs"]
        print(f"  {label:<40} import {f['import']:.2f} s + preload {f['preload']:.2f} s; first job "
              f"{first['s'] * 1000:7.1f} ms ({first['modules']} modules imported), second job "
              f"{second['s'] * 1000:5.1f} ms ({second['modules']} modules); first / second "
              f"{first['s'] / second['s']:.0f}x")


def live_worker(args: argparse.Namespace) -> bool:
    heading(f"2. a live worker, --concurrency {args.concurrency}, {args.rounds} rounds of {args.concurrency} "
            "simultaneous jobs")
    with bench_stack.running(args) as stack:
        t0 = time.perf_counter()
        stack.start_worker("worker", args.concurrency)
        stack.wait_for_workers()
        print(f"  worker process started -> answers a ping: {time.perf_counter() - t0:.2f} s")
        probe = Probe(stack)
        records = []
        with stack.client() as http:
            for _ in range(args.rounds):
                ids = [http.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(args.concurrency)]
                for job_id in ids:
                    probe.wait(job_id, "done")
                    records.append(probe.records[job_id])
                time.sleep(0.05)
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_pid[r["claimed"]["pid"]].append(r)
    cores = usable_cores()
    threads = {pid: jobs[0]["fit_start"]["threads"] for pid, jobs in by_pid.items()}
    later_total = 0
    for pid, jobs in sorted(by_pid.items()):
        first, later = jobs[0], jobs[1:]
        took = [j["done"]["at"] - j["claimed"]["at"] for j in jobs]
        imported = first["done"]["modules"] - first["claimed"]["modules"]
        later_imports = sum(j["done"]["modules"] - j["claimed"]["modules"] for j in later)
        warm = median(took[1:]) if later else float("nan")
        print(f"  pool process {pid}: {threads[pid]} torch thread(s); {len(jobs)} jobs; first job "
              f"{took[0] * 1000:6.1f} ms, importing {imported} modules; later jobs median {warm * 1000:5.1f} ms, "
              f"importing {later_imports}; first / later {took[0] / warm:.1f}x")
        later_total += later_imports
    total = sum(threads.values())
    ok = target("torch threads over all pool processes", f"{total} on {cores} cores", f"<= {cores}",
                total <= cores)
    ok &= target("modules imported by the jobs after each process's first", str(later_total), "0",
                 later_total == 0)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    bench_stack.add_arguments(parser)
    args = parser.parse_args()
    print(f"Worker start-up: {machine()}")
    imports()
    return 0 if live_worker(args) else 1


if __name__ == "__main__":
    sys.exit(main())
