"""The worker registry over real HTTP: the stack's own workers report themselves, with what runs on them."""

import os
import subprocess
import uuid

from kiln.embedded import wait_until
from kiln.launch import worker_command
from tests.conftest import start_process, stop_process


def workers_by_name(client) -> dict[str, dict]:
    response = client.get("/v1/workers")
    assert response.status_code == 200, response.text
    return {w["name"]: w for w in response.json()["items"]}


def test_workers_report_themselves(stack, client):
    workers = workers_by_name(client)
    trainer = next(w for w in workers.values() if stack.settings.queue in w["queues"])
    assert trainer["state"] == "online" and trainer["concurrency"] == 1
    assert trainer["devices"][0]["kind"] == "cpu" and trainer["devices"][0]["cores"] == os.cpu_count()
    assert any(f"{stack.settings.queue}.predict" in w["queues"] for w in workers.values())

    job = client.post("/v1/jobs", json={"data": {"dataset": "digits"}, "epochs": 10_000}).json()
    running = stack.wait_for_job(client, job["id"], lambda j: j["status"] == "running")
    seen = wait_until(lambda: (w := workers_by_name(client)[running["worker"]])["running"] == 1 and w, timeout=30,
                      what="the registry to show the running job")
    assert seen["running_jobs"] == [job["id"]]
    with stack.client(api_key=stack.create_key(f"peer-{uuid.uuid4().hex[:6]}")) as peer:
        theirs = workers_by_name(peer)[running["worker"]]
        assert theirs["running"] == 1 and theirs["running_jobs"] == [], "another owner's job ids stay hidden"
    client.post(f"/v1/jobs/{job['id']}/cancel")
    stack.wait_for_job(client, job["id"], lambda j: j["status"] == "cancelled")


def test_a_stopped_worker_says_so_and_a_killed_one_goes_lost(stack, client, tmp_path):
    queue = f"registry-{uuid.uuid4().hex[:6]}"
    env = {**stack.env, "KILN_QUEUE": queue}
    names = [f"reg-{i}-{uuid.uuid4().hex[:6]}@test" for i in range(2)]
    procs = [start_process(worker_command(1, queue, name), env, tmp_path / f"{i}.log") for i, name in enumerate(names)]
    try:
        wait_until(lambda: all(workers_by_name(client).get(n, {}).get("state") == "online" for n in names),
                   timeout=60, what="both workers to register")
        stop_process(procs[0])  # SIGTERM: a clean shutdown
        procs[1].kill()  # SIGKILL: no goodbye; its heartbeat just stops
        # The stack's lease is 5 s: a worker silent for longer is lost.
        wait_until(lambda: [workers_by_name(client)[n]["state"] for n in names] == ["stopped", "lost"],
                   timeout=60, what="one worker stopped, the other lost")
    finally:
        for p in procs:
            stop_process(p)
        # Its pool process outlived it (it was SIGKILLed): end it too.
        subprocess.run(["pkill", "-9", "-f", f"--hostname {names[1]}"], check=False)
