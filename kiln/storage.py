"""The local artifact store: files keyed by job id or dataset id, written atomically.

Paths are built from validated ids and fixed file names only, never from user strings.
"""

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WEIGHTS = "weights.safetensors"
ENCODER = "encoder.safetensors"  # an autoencoder's encoder, downloadable on its own
DATASET = "data.safetensors"  # an uploaded dataset's arrays: x float32 (rows, features), y int64 or float32


def parse_id(value: str) -> str:
    """Canonical form of a job or dataset id, or ValueError; the only door from a string to a path."""
    parsed = uuid.UUID(value)
    if parsed.version != 4 or str(parsed) != value:  # exactly the form kiln issues, nothing that merely parses
        raise ValueError(f"not a kiln id: {value!r}")
    return value



@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it is fsynced, renamed over `path`, and the
    directory fsynced, so readers see the old file or the whole new one, even after a power cut. The temp
    name is unique, so two writers of one path (a superseded attempt and its successor) never share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / parse_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        if name not in {WEIGHTS, ENCODER}:
            raise ValueError(f"unknown artifact {name!r}")
        return self.job_dir(job_id) / name

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def checkpoint_path(self, job_id: str, epoch: int) -> Path:
        return self.checkpoint_dir(job_id) / f"epoch-{int(epoch):06d}.safetensors"

    def dataset_path(self, dataset_id: str) -> Path:
        return self.root / "datasets" / parse_id(dataset_id) / DATASET

    def open_artifact(self, job_id: str, name: str) -> Path | None:
        """The file if present as a regular file inside the store (no symlinks followed out)."""
        return self._regular_file(self.path(job_id, name))

    def open_dataset(self, dataset_id: str) -> Path | None:
        """An uploaded dataset's file, on the same terms as open_artifact."""
        return self._regular_file(self.dataset_path(dataset_id))

    def _regular_file(self, path: Path) -> Path | None:
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            return None
        if not real.is_relative_to(self.root) or not real.is_file() or path.is_symlink():
            return None
        return real
