"""How `kiln worker` turns a host into Celery worker processes: one per GPU, pinned to it with
CUDA_VISIBLE_DEVICES, consuming the GPU queue; and a CPU worker (N pool processes) consuming the CPU queue, on a
host without GPUs or when --concurrency asks for one beside them.
Both take the jobs that may run anywhere (device "auto") and any named pools (`--queue`)."""

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.devices import Gpu
from kiln.dispatch import predict_queue, worker_queues
from kiln.settings import Settings


def worker_command(concurrency: int, queues: str | Sequence[str], hostname: str | None = None) -> list[str]:
    """The Celery worker command line every kiln worker runs (`kiln up`, `kiln worker`, the tests)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
        "--concurrency", str(concurrency), "--queues", queues if isinstance(queues, str) else ",".join(queues),
        "--loglevel", "INFO", "--hostname", hostname or f"kiln-{os.getpid()}@{socket.gethostname()}",
        "--without-mingle", "--without-gossip",
    ]


@dataclass(frozen=True)
class WorkerProcess:
    name: str  # the Celery node name, also the worker's name in the registry
    concurrency: int
    queues: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the caller's environment

    def command(self) -> list[str]:
        return worker_command(self.concurrency, self.queues, self.name)


def choose_gpus(option: str, gpus: list[Gpu]) -> list[Gpu]:
    """`--gpus`: "auto" (every GPU the host has, maybe none), "all" (and there must be one), "none", or "0,2"."""
    if option == "auto":
        return gpus
    if option == "none":
        return []
    if option == "all":
        if not gpus:
            raise ValueError("--gpus all, but nvidia-smi finds no GPU on this host; use --gpus none for a CPU worker")
        return gpus
    wanted = [part.strip() for part in option.split(",")]
    if not all(part.isdigit() for part in wanted):
        raise ValueError(f"--gpus {option!r}: give 'auto', 'all', 'none' or GPU indices such as 0,2")
    by_index = {g.index: g for g in gpus}
    if missing := [i for i in wanted if int(i) not in by_index]:
        have = ", ".join(str(i) for i in by_index) or "none"
        raise ValueError(f"--gpus {option!r}: this host has no GPU {', '.join(missing)} (it has: {have})")
    return [by_index[int(i)] for i in dict.fromkeys(wanted)]


def plan(settings: Settings, *, role: str, gpus: list[Gpu], concurrency: int | None, extra_queues: tuple[str, ...],
         host: str, tag: str) -> list[WorkerProcess]:
    """The processes to start. A GPU host runs one per GPU and no CPU worker unless `concurrency` asks for one;
    a CPU host runs one CPU worker with `concurrency` (default: the setting) pool processes."""
    if role == "predict":
        return [WorkerProcess(f"predict-{tag}@{host}", concurrency or 1, [predict_queue(settings)],
                              {"CUDA_VISIBLE_DEVICES": ""})]
    processes = [
        WorkerProcess(f"kiln-gpu{g.index}-{tag}@{host}", 1, worker_queues(settings, gpu=True, extra=extra_queues),
                      {"CUDA_VISIBLE_DEVICES": g.uuid, "KILN_WORKER_CONCURRENCY": "1"})
        for g in gpus
    ]
    cpu_pool = concurrency if concurrency is not None else (0 if gpus else settings.worker_concurrency)
    if cpu_pool > 0:
        # Hidden GPUs: "auto" jobs taken here train on the CPU, leaving each GPU to its own process.
        processes.append(WorkerProcess(f"kiln-{tag}@{host}", cpu_pool,
                                       worker_queues(settings, gpu=False, extra=extra_queues),
                                       {"CUDA_VISIBLE_DEVICES": "", "KILN_WORKER_CONCURRENCY": str(cpu_pool)}))
    return processes


def run(processes: list[WorkerProcess]) -> int:
    """Start the processes and wait. SIGTERM or Ctrl-C is passed to each (they hand their jobs back); if one exits
    on its own the rest are stopped too, and the exit code says so, for a supervisor (systemd, Docker) to restart."""
    if len(processes) == 1:  # nothing to supervise: become the worker, so signals reach Celery directly
        os.environ.update(processes[0].env)
        os.execv(sys.executable, processes[0].command())
    children = [subprocess.Popen(p.command(), env={**os.environ, **p.env}) for p in processes]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)  # the terminal sends Ctrl-C to the children as well; one TERM each
    pid, status = os.wait()
    forward(signal.SIGTERM, None)
    for child in children:
        child.wait()
    return 0 if os.waitstatus_to_exitcode(status) == 0 else 1
