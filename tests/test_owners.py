"""Owners and their keys, and the bounds on what one owner may ask of the server, over real HTTP."""

import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, text

from tests.test_api import assert_error

# Long enough that none of these jobs ends while a test counts them (cancelled at the end).
LONG = {"data": {"dataset": "digits"}, "epochs": 10_000}


def new_owner() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


def test_key_lifecycle(stack):
    owner = new_owner()
    key = stack.create_key(owner)
    key_id = key.split("_")[1]
    listed = stack.kiln("keys", "list", "--owner", owner)
    assert listed.returncode == 0 and listed.stdout.split()[:2] == [key_id, owner]
    assert key not in listed.stdout, "a listing names keys by id, never shows them"

    # The database holds the digest and the id, nowhere the key.
    engine = create_engine(stack.settings.db_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id}).mappings().one()
    engine.dispose()
    assert row["digest"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["owner"] == owner and key not in {str(v) for v in row.values()}

    with stack.client(api_key=key) as mine:
        assert mine.get("/v1/jobs").json()["items"] == [], "a new owner sees no one else's jobs"
        job = mine.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 1}).json()
        assert mine.get(f"/v1/jobs/{job['id']}").status_code == 200

        revoked = stack.kiln("keys", "revoke", key_id)
        assert revoked.returncode == 0, revoked.stderr
        err = assert_error(mine.get(f"/v1/jobs/{job['id']}"), 401, "unauthorized")
        assert key_id in err["message"] and "revoked" in err["message"]
    again = stack.kiln("keys", "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr

    # Another key of the same owner still works, and still sees the job: it is the owner's, not the key's.
    with stack.client(api_key=stack.create_key(owner)) as other_key:
        assert other_key.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_owner_names_are_checked(stack):
    done = stack.kiln("keys", "create", "--owner", "Robert'); DROP TABLE jobs;--")
    assert done.returncode == 1
    assert "not a valid name" in done.stderr and done.stdout == ""


def test_a_key_for_another_deployment_is_401(stack):
    # Well-formed, right length, unknown id; and a known id with the wrong secret.
    key = stack.create_key(new_owner())
    forged = key[: -4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for candidate in ("kiln_0123456789ab_" + "x" * 43, forged):
        with stack.client(api_key=candidate) as client:
            err = assert_error(client.get("/v1/jobs"), 401, "unauthorized")
            assert "Unknown API key" in err["message"]


def test_cost_bounds_refuse_before_queueing(client, stack):
    newest_before = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
    queued_before = stack.queue_length()

    huge = {"data": {"dataset": "digits"}, "model": {"type": "mlp", "hidden": [4096] * 16}}
    err = assert_error(client.post("/v1/jobs", json=huge), 422, "validation_error")
    assert err["details"][0]["field"] == "body.model"
    assert "252,026,890 parameters" in err["message"], err["message"]

    long = {"data": {"dataset": "sine", "samples": 200_000}, "epochs": 10_000}
    err = assert_error(client.post("/v1/jobs", json=long), 422, "validation_error")
    assert err["details"][0]["field"] == "body.epochs"
    assert "Ask for at most 2,500 epochs." in err["message"], err["message"]

    assert client.get("/v1/jobs", params={"limit": 1}).json()["items"] == newest_before, "nothing was stored"
    assert stack.queue_length() == queued_before, "nothing was queued"


def test_active_jobs_are_limited_per_owner(stack):
    limit = stack.settings.max_active_jobs
    owner_key, neighbour_key = stack.create_key(new_owner()), stack.create_key(new_owner())
    with stack.client(api_key=owner_key) as mine:
        ids = [mine.post("/v1/jobs", json=LONG).json()["id"] for _ in range(limit - 3)]

        # Ten at once for the last three places: the count is serialised per owner, so exactly three get in.
        def submit(_):
            with stack.client(api_key=owner_key) as c:
                return c.post("/v1/jobs", json=LONG)

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(submit, range(10)))
        assert sorted(r.status_code for r in answers) == [201] * 3 + [429] * 7, [r.text for r in answers]
        ids += [r.json()["id"] for r in answers if r.status_code == 201]
        refused = next(r for r in answers if r.status_code == 429)
        err = assert_error(refused, 429, "too_many_requests")
        assert refused.headers["retry-after"] == "30" and f"{limit} jobs queued or running" in err["message"]
        assert len(mine.get("/v1/jobs", params={"limit": 100}).json()["items"]) == limit, "no refused job was kept"

        # The limit is the owner's own: a neighbour submits freely.
        with stack.client(api_key=neighbour_key) as neighbour:
            neighbours = neighbour.post("/v1/jobs", json={"data": {"dataset": "iris"}, "epochs": 1})
            assert neighbours.status_code == 201

        # A finished (here: cancelled) job frees its place.
        assert mine.post(f"/v1/jobs/{ids[-1]}/cancel").status_code in (200, 202)
        stack.wait_for_job(mine, ids[-1], lambda j: j["status"] == "cancelled")
        freed = mine.post("/v1/jobs", json=LONG)
        assert freed.status_code == 201, freed.text
        ids[-1] = freed.json()["id"]

        for job_id in ids:  # leave the shared worker free for the tests that follow
            mine.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in ids:
            stack.wait_for_job(mine, job_id, lambda j: j["status"] == "cancelled")
