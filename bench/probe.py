"""kiln's worker with timestamps for the benchmarks: `celery -A bench.probe worker ...` (bench/stack.py runs it).

It is worker.celery_app unchanged, plus:
- around worker.runner._train (entered right after the claim committed) and worker.runner.fit (the training
  loop), a record of when each began and ended, in which process, with how many torch threads and how many
  modules that process had imported by then;
- `bench.bare`, a task that does nothing but record when it began: bare Celery on the same app configuration,
  broker and worker command line, as the baseline for kiln's own submit-to-start latency.

Each record is one JSON object pushed onto a Redis list (KILN_BENCH_PROBE_KEY) on the broker, after its timestamp
is taken, so the benchmark waits on BLPOP instead of polling. Records are held back and pushed together at the
loop's start and at the job's end, so the probe adds no round trip between the claim and the loop's start.
"""

import json
import os
import sys
import time
from functools import lru_cache

import redis
import torch

import worker.runner as runner
from kiln.settings import get_settings
from worker.celery_app import app

__all__ = ["app"]

_job: str | None = None  # the job this pool process is training
_pending: list[str] = []


@lru_cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().broker_url)  # opened lazily: after the fork, in the pool process


def record(kind: str, key: str | None, push: bool = True) -> None:
    entry = {"kind": kind, "key": key, "at": time.time(), "pid": os.getpid(), "threads": torch.get_num_threads(),
             "modules": len(sys.modules)}
    _pending.append(json.dumps(entry))
    if push:
        _redis().rpush(os.environ["KILN_BENCH_PROBE_KEY"], *_pending)
        _pending.clear()


_train, _fit = runner._train, runner.fit


def _probed_train(claim, lease, settings):
    global _job
    _job = claim.job_id
    record("claimed", claim.job_id, push=False)
    try:
        return _train(claim, lease, settings)
    finally:
        record("done", claim.job_id)


def _probed_fit(*args, **kwargs):
    record("fit_start", _job)
    try:
        return _fit(*args, **kwargs)
    finally:
        record("fit_end", _job, push=False)


runner._train = _probed_train
runner.fit = _probed_fit


@app.task(name="bench.bare", ignore_result=True)
def bare(key: str) -> None:
    record("bare_start", key)
