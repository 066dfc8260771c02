"""The local artifact store: files keyed by job id, written atomically.

Paths are built from validated ids and fixed file names only, never from user strings.
"""

import uuid
from pathlib import Path

WEIGHTS = "weights.safetensors"
ENCODER = "encoder.safetensors"  # an autoencoder's encoder, downloadable on its own


def parse_job_id(value: str) -> str:
    """Canonical form of a job id, or ValueError; the only door from a string to a path."""
    return str(uuid.UUID(value, version=4))


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / parse_job_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        if name not in {WEIGHTS, ENCODER}:
            raise ValueError(f"unknown artifact {name!r}")
        return self.job_dir(job_id) / name

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def checkpoint_path(self, job_id: str, epoch: int) -> Path:
        return self.checkpoint_dir(job_id) / f"epoch-{int(epoch):06d}.safetensors"

    def open_artifact(self, job_id: str, name: str) -> Path | None:
        """The file if present as a regular file inside the store (no symlinks followed out)."""
        path = self.path(job_id, name)
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            return None
        if not real.is_relative_to(self.root) or not real.is_file() or path.is_symlink():
            return None
        return real

