"""The reconciler's passes, called directly against a real database (SQLite, or PostgreSQL with
KILN_TEST_DATABASE_URL) and a real broker: one pass at a time across API processes (on PostgreSQL a pass holds an
advisory lock, and a pass that finds it taken does nothing; on SQLite every pass runs), and a message is lost only
when the broker truly holds it nowhere."""

import base64
import json
import threading
import time
import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.services import reconciler
from api.services.reconciler import LOCK_KEY, reconcile
from kiln.db import make_engine, utcnow
from kiln.dispatch import TRAIN_TASK, make_celery
from kiln.settings import Settings
from kiln.tables import Job, JobEvent, JobStatus


@pytest.fixture
def settings(tmp_path, engine) -> Settings:
    # A long outbox grace: the jobs here are never published, so no pass needs a broker.
    return Settings(data_dir=tmp_path, database_url=engine.url.render_as_string(hide_password=False),
                    outbox_grace_s=3600)


def lost_job(engine) -> str:
    """A running job whose worker stopped renewing its lease a minute ago: the reconciler queues it again."""
    job_id = str(uuid.uuid4())
    with Session(engine) as session:
        session.add(Job(
            id=job_id, owner="default", status=JobStatus.running, spec={"data": {"dataset": "iris"}, "epochs": 3},
            queue="kiln", created_at=utcnow(), published_at=utcnow(), started_at=utcnow(), epochs_completed=1,
            checkpoint_epoch=1, attempt=1, worker="gone@host", lease_token=str(uuid.uuid4()),
            lease_expires_at=utcnow() - timedelta(minutes=1), cancel_requested=False,
        ))
        session.commit()
    return job_id


def status(engine, job_id: str) -> JobStatus:
    with Session(engine) as session:
        return session.get(Job, job_id).status


def run_pass(engine, settings: Settings) -> reconciler.Reconciled:
    with Session(engine) as session:
        return reconcile(session, settings)


def test_a_pass_requeues_a_lost_job(engine, settings):
    job_id = lost_job(engine)
    assert run_pass(engine, settings).requeued == 1
    assert status(engine, job_id) == JobStatus.queued


def postgresql_only(engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the lock is PostgreSQL's (set KILN_TEST_DATABASE_URL); on SQLite every pass runs")


def test_a_pass_skips_its_turn_while_another_holds_the_lock(engine, settings):
    postgresql_only(engine)
    job_id = lost_job(engine)
    with engine.connect() as other, other.begin():  # another API process, in the middle of its pass
        assert other.scalar(select(func.pg_try_advisory_xact_lock(LOCK_KEY)))
        done = run_pass(engine, settings)
        assert not done and status(engine, job_id) == JobStatus.running
    assert run_pass(engine, settings).requeued == 1, "the lock went with the other pass"
    assert status(engine, job_id) == JobStatus.queued


def test_a_worker_cut_off_mid_transaction_holds_its_locks_for_the_lease_at_most(engine, settings):
    """A worker host that vanishes between two statements of a transaction leaves its PostgreSQL session open, the
    job's row locked, until TCP gives up on it (hours). Workers' sessions end once idle in a transaction for the
    lease (kiln.db.end_idle_transactions_after), so the reconciler waits that long, not hours."""
    postgresql_only(engine)
    job_id = lost_job(engine)
    worker = make_engine(engine.url.render_as_string(hide_password=False), idle_transaction_limit_s=1)
    stranded = worker.connect()
    stranded.begin()
    stranded.execute(update(Job).where(Job.id == job_id).values(epochs_completed=2))  # the row locked; then silence
    passes = []
    reconciling = threading.Thread(target=lambda: passes.append(run_pass(engine, settings)), daemon=True)
    reconciling.start()
    try:
        reconciling.join(timeout=20)
        assert not reconciling.is_alive(), "the pass is still waiting on the stranded worker's row lock"
        assert passes[0].requeued == 1 and status(engine, job_id) == JobStatus.queued
    finally:
        stranded.invalidate()  # closes its socket: the server rolls back, if it had not ended the session already
        worker.dispose()
        reconciling.join(timeout=20)


def test_the_lock_is_held_for_the_whole_pass_and_released_after(engine, settings, monkeypatch):
    postgresql_only(engine)
    seen = []

    def outbox(session, settings, done):  # the pass's last step: is the lock still held by this pass?
        with engine.connect() as other, other.begin():
            seen.append(other.scalar(select(func.pg_try_advisory_xact_lock(LOCK_KEY))))

    monkeypatch.setattr(reconciler, "_outbox", outbox)
    lost_job(engine)  # the pass commits once in between, which must not release the lock
    assert run_pass(engine, settings).requeued == 1
    assert seen == [False], "another process could take the lock during the pass"
    with engine.connect() as other, other.begin():
        assert other.scalar(select(func.pg_try_advisory_xact_lock(LOCK_KEY))), "the lock outlived the pass"


def test_a_pass_that_fails_releases_the_lock(engine, settings, monkeypatch):
    postgresql_only(engine)

    def broken(*_):
        raise RuntimeError("the broker went away")

    monkeypatch.setattr(reconciler, "_lost_messages", broken)
    with pytest.raises(RuntimeError):
        run_pass(engine, settings)
    with engine.connect() as other, other.begin():
        assert other.scalar(select(func.pg_try_advisory_xact_lock(LOCK_KEY)))


def job_of(raw: bytes) -> str:
    """The job id a kiln.train message carries (kombu's Redis layout: a base64 JSON body of [args, kwargs, ...])."""
    return json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]


def test_a_message_a_worker_is_taking_is_not_lost_but_one_the_broker_dropped_is(engine, settings, broker_url,
                                                                                  monkeypatch):
    """kombu takes a message in two steps, popping it from the queue and then recording it as unacknowledged;
    a pass that reads the broker in between must not call it lost. A message in neither place twice is."""
    settings = settings.model_copy(update={"broker_url": broker_url, "queue": f"reco-{uuid.uuid4().hex[:6]}"})
    taking, dropped = str(uuid.uuid4()), str(uuid.uuid4())
    with Session(engine) as session:
        for job_id in (taking, dropped):  # published a minute ago and still queued: both get looked for
            session.add(Job(id=job_id, owner="default", status=JobStatus.queued, spec={"data": {"dataset": "iris"}},
                            queue=settings.queue, created_at=utcnow(), published_at=utcnow() - timedelta(minutes=1),
                            epochs_completed=0, attempt=0, cancel_requested=False))
        session.commit()
    celery = make_celery(settings)
    r = redis.Redis.from_url(broker_url)
    tag = f"test-{uuid.uuid4().hex}"
    try:
        for job_id in (taking, dropped):
            celery.send_task(TRAIN_TASK, args=[job_id], queue=settings.queue)
        popped = {job_of(m): m for m in (r.lpop(settings.queue), r.lpop(settings.queue))}  # both leave the queue
        looks = []
        real = reconciler.job_ids_in_broker

        def look(*args, **kwargs):
            looks.append(held := real(*args, **kwargs))
            if len(looks) == 1:  # the worker finishes taking it, just after the pass's first look
                r.hset("unacked", tag, json.dumps([json.loads(popped[taking]), settings.queue, settings.queue]))
                r.zadd("unacked_index", {tag: time.time()})
            return held

        monkeypatch.setattr(reconciler, "job_ids_in_broker", look)
        assert run_pass(engine, settings).republished == 1
        # (a shared broker may hold other tests' messages too)
        assert [held & {taking, dropped} for held in looks] == [set(), {taking}], "the pass did not look twice"
        with Session(engine) as session:
            kinds = dict(session.execute(select(JobEvent.job_id, JobEvent.kind)).all())
            assert kinds == {dropped: "message_lost"}
            assert session.get(Job, taking).published_at is not None
            assert session.get(Job, dropped).published_at is None  # back in the outbox
    finally:
        r.hdel("unacked", tag)
        r.zrem("unacked_index", tag)
        r.delete(settings.queue)
        r.close()
        celery.close()
