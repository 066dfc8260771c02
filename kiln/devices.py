"""The cores this process may use, and the GPUs of this host as nvidia-smi reports them.

Asked of nvidia-smi rather than torch: importing torch takes seconds, and initialising CUDA in a process that
later forks (the Celery main process forks its pool) breaks CUDA in every child.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the platform has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_gb: float

    def as_device(self) -> dict:
        """The registry's form (GET /v1/workers)."""
        return {"id": f"cuda:{self.index}", "kind": "cuda", "name": self.name, "uuid": self.uuid,
                "memory_gb": self.memory_gb}


def host_gpus() -> list[Gpu]:
    """Every NVIDIA GPU on the host (CUDA_VISIBLE_DEVICES does not apply); [] without nvidia-smi or a driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # no driver loaded, or it hangs: a CPU host for kiln
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(out: str) -> list[Gpu]:
    gpus = []
    for line in out.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 4 and fields[0].isdigit():
            memory = float(fields[3]) / 1024 if fields[3].replace(".", "", 1).isdigit() else 0.0
            gpus.append(Gpu(int(fields[0]), fields[1], fields[2], round(memory, 1)))
    return gpus


def visible(gpus: list[Gpu], cuda_visible_devices: str | None = None) -> list[Gpu]:
    """The GPUs a process may use under CUDA_VISIBLE_DEVICES (indices or UUIDs, as CUDA reads them)."""
    setting = os.environ.get("CUDA_VISIBLE_DEVICES") if cuda_visible_devices is None else cuda_visible_devices
    if setting is None:
        return gpus
    chosen = []
    for token in filter(None, (t.strip() for t in setting.split(","))):
        match = [g for g in gpus if token == str(g.index) or g.uuid.startswith(token)]
        if not match:
            break  # CUDA stops at the first entry it cannot resolve
        chosen.append(match[0])
    return chosen
