"""/metrics' epoch histogram: the counted rows against the scan of every epoch they replaced; and what counting
costs the epoch commit.

    .venv/bin/python -m bench.epoch_counts [--epochs 1000000] [--repeats 7] [--database-url ...]

A throwaway PostgreSQL database gets one job with --epochs epoch rows (generate_series, random durations under
2 s) and their counts (kiln.epoch_counts.count_epoch for a sample of them: the counted rows are a dozen however many
epochs fed them). Then, alternately, --repeats times each in one session:
  1. the scrape's read: kiln.epoch_counts.histogram, against the aggregate over epoch_metrics that the scrape ran
     before (migration 0009), the baseline;
  2. the statement counting adds to each epoch commit: count_epoch (its upsert built once per dialect), against the
     same upsert built on every call (as first written) and a bare SELECT 1, the baseline (one round trip).
"""

import argparse
import sys
import time

from sqlalchemy import case, create_engine, func, select, text
from sqlalchemy.orm import Session

from bench import stack as bench_stack
from bench.report import heading, machine, median
from kiln import epoch_counts
from kiln.tables import EpochMetric

# The scrape's read before migration 0009: every epoch, every scrape.
SCAN = select(func.count(), func.sum(EpochMetric.duration_s),
              *(func.sum(case((EpochMetric.duration_s <= b, 1), else_=0)) for b in epoch_counts.EPOCH_BUCKETS))


def count_rebuilt(session: Session, duration_s: float) -> None:
    """count_epoch as first written: the same upsert, built on every call (the cache's undecorated function)."""
    statement = epoch_counts._counted.__wrapped__(session.get_bind().dialect.name)
    session.execute(statement, {"le": epoch_counts.bucket(duration_s), "seconds": duration_s})


def timed(run, calls: int) -> float:
    """Seconds per call of `run()`, over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500, help="statements per timing of the counting statement")
    bench_stack.add_arguments(parser)
    args = parser.parse_args()
    print(f"Epoch counts: {machine()}; PostgreSQL on this machine; {args.epochs:,} epochs")
    with bench_stack.throwaway_database(args.database_url) as url:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, owner, status, spec, queue, created_at, epochs_completed, checkpoint_epoch, "
                "attempt, cancel_requested) VALUES ('j', 'default', 'succeeded', '{}', 'kiln', now(), 0, 0, 1, false)"))
            conn.execute(text(
                "INSERT INTO epoch_metrics (job_id, epoch, attempt, train_loss, lr, duration_s, samples_per_s, "
                "created_at) SELECT 'j', g, 1, 1.0, 0.1, random() * 2, 1.0, now() FROM generate_series(1, :n) g"),
                {"n": args.epochs})
            conn.execute(text("ANALYZE epoch_metrics"))
        with Session(engine) as session:
            for duration in session.scalars(select(EpochMetric.duration_s).limit(2000)).all():
                epoch_counts.count_epoch(session, duration)
            session.commit()

            scan, counted = [], []
            for _ in range(args.repeats):
                scan.append(timed(lambda: session.execute(SCAN).one(), 1))
                counted.append(timed(lambda: epoch_counts.histogram(session), 1))
                session.rollback()
            heading(f"the scrape's read, {args.repeats} alternating runs each")
            print(f"  scan of epoch_metrics (before, baseline)   median {median(scan) * 1e3:8.2f} ms")
            print(f"  counted rows (kiln.epoch_counts.histogram) median {median(counted) * 1e3:8.2f} ms")
            print(f"  ratio scan / counted: {median(scan) / median(counted):.0f}x")

            runs: dict[str, list[float]] = {"SELECT 1 (one round trip, baseline)": [],
                                            "count_epoch, upsert built once": [],
                                            "the upsert built on every call": []}
            calls = (lambda: session.execute(text("SELECT 1")), lambda: epoch_counts.count_epoch(session, 0.02),
                     lambda: count_rebuilt(session, 0.02))
            for _ in range(args.repeats):
                for times, call in zip(runs.values(), calls, strict=True):
                    times.append(timed(call, args.calls))
                    session.commit()
            heading(f"the counting statement, {args.calls} calls x {args.repeats} alternating runs")
            base = median(next(iter(runs.values())))
            for label, times in runs.items():
                print(f"  {label:<38} median {median(times) * 1e6:6.0f} us   / SELECT 1: {median(times) / base:.2f}")
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
