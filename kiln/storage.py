"""The artifact store: files keyed by job id or dataset id, in a local directory or S3-compatible object storage.

Paths and keys are built from validated ids and fixed file names only, never from user strings. Both stores lay
files out alike (jobs/<id>/weights.safetensors, jobs/<id>/checkpoints/epoch-000003.safetensors,
datasets/<id>/data.safetensors). Workers write files to a local scratch directory and hand them to the store
(put_*); the API hands it uploads' bytes. So with S3 no filesystem is shared between the API and the workers.
"""

import errno
import io
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    from kiln.settings import Settings

log = logging.getLogger("kiln.storage")

WEIGHTS = "weights.safetensors"
ENCODER = "encoder.safetensors"  # an autoencoder's encoder, downloadable on its own
DATASET = "data.safetensors"  # an uploaded dataset's arrays: x float32 (rows, features), y int64 or float32
ARTIFACTS = frozenset({WEIGHTS, ENCODER})


def parse_id(value: str) -> str:
    """Canonical form of a job or dataset id, or ValueError; the only door from a string to a path."""
    parsed = uuid.UUID(value)
    if parsed.version != 4 or str(parsed) != value:  # exactly the form kiln issues, nothing that merely parses
        raise ValueError(f"not a kiln id: {value!r}")
    return value


def is_id(value: str) -> bool:
    try:
        return parse_id(value) == value
    except ValueError:
        return False


# --- the layout, shared by both stores: relative keys from ids and fixed names only ------------------------


def artifact_key(job_id: str, name: str) -> str:
    if name not in ARTIFACTS:
        raise ValueError(f"unknown artifact {name!r}")
    return f"jobs/{parse_id(job_id)}/{name}"


def checkpoints_key(job_id: str) -> str:
    return f"jobs/{parse_id(job_id)}/checkpoints"


def checkpoint_name(epoch: int) -> str:
    if int(epoch) < 0:
        raise ValueError(f"not an epoch: {epoch!r}")
    return f"epoch-{int(epoch):06d}.safetensors"


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{parse_id(dataset_id)}/{DATASET}"


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


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or refuses kiln (a missing bucket, wrong credentials): a sentence that says
    which. The API answers it with a 503."""


class Store(Protocol):
    """What the API and the workers need of an artifact store. put_* given a local file take ownership of it
    (moved into the store, or uploaded and deleted); an object is visible only once whole."""

    def open_artifact(self, job_id: str, name: str) -> BinaryIO | None:
        """A job's WEIGHTS or ENCODER, opened (seekable, with a fileno), or None if it is not there."""

    def open_dataset(self, dataset_id: str) -> BinaryIO | None:
        """An uploaded dataset's file, on the same terms as open_artifact."""

    def put_dataset(self, dataset_id: str, data: bytes) -> None: ...

    def put_artifact(self, job_id: str, name: str, local: Path) -> None: ...

    def put_checkpoint(self, job_id: str, epoch: int, local: Path) -> None:
        """Stores the epoch's checkpoint; when this returns, a resumed attempt can fetch it."""

    def fetch_checkpoint(self, job_id: str, epoch: int, local: Path) -> bool:
        """Copies the epoch's checkpoint to `local`; False if the store has none."""

    def drop_checkpoint(self, job_id: str, epoch: int) -> None:
        """Deletes the epoch's checkpoint if the store holds it: after each epoch, the one it replaced."""

    def drop_checkpoints(self, job_id: str) -> None:
        """Deletes all the job's checkpoints: once it succeeded, since a finished job never resumes."""


def make_store(settings: "Settings") -> Store:
    """The store the settings choose: S3 when KILN_S3_BUCKET is set, else the local directory."""
    if settings.s3_bucket:
        return _s3_store(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)
    return LocalStore(settings.artifacts_path)


@lru_cache(maxsize=8)
def _s3_store(bucket: str, prefix: str, endpoint_url: str, region: str) -> "S3Store":
    """One per process and configuration: a boto3 client takes a quarter of a second to build (each job would
    pay it), and one client is safe to share between threads."""
    return S3Store(bucket, prefix, endpoint_url, region)


# --- local directory ----------------------------------------------------------------------------------------


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / parse_id(job_id)

    def path(self, job_id: str, name: str) -> Path:
        return self.root / artifact_key(job_id, name)

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.root / checkpoints_key(job_id)

    def checkpoint_path(self, job_id: str, epoch: int) -> Path:
        return self.checkpoint_dir(job_id) / checkpoint_name(epoch)

    def dataset_path(self, dataset_id: str) -> Path:
        return self.root / dataset_key(dataset_id)

    def open_artifact(self, job_id: str, name: str) -> BinaryIO | None:
        """The artifact, opened, if it is a regular file inside the store. Opened here, not checked and returned
        as a path: what was checked is what the caller reads, even if the store changes meanwhile."""
        return self._open_inside(self.path(job_id, name))

    def open_dataset(self, dataset_id: str) -> BinaryIO | None:
        """An uploaded dataset's file, on the same terms as open_artifact."""
        return self._open_inside(self.dataset_path(dataset_id))

    def put_dataset(self, dataset_id: str, data: bytes) -> None:
        write_atomically(self.dataset_path(dataset_id), data)

    def put_artifact(self, job_id: str, name: str, local: Path) -> None:
        _move_into(local, self.path(job_id, name))

    def put_checkpoint(self, job_id: str, epoch: int, local: Path) -> None:
        _move_into(local, self.checkpoint_path(job_id, epoch))

    def fetch_checkpoint(self, job_id: str, epoch: int, local: Path) -> bool:
        file = self._open_inside(self.checkpoint_path(job_id, epoch))
        if file is None:
            return False
        with file, local.open("wb") as out:  # resuming is rare: a copy keeps the stored one untouched
            shutil.copyfileobj(file, out, 1 << 20)
        return True

    def drop_checkpoint(self, job_id: str, epoch: int) -> None:
        self.checkpoint_path(job_id, epoch).unlink(missing_ok=True)

    def drop_checkpoints(self, job_id: str) -> None:
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)

    def _open_inside(self, path: Path) -> BinaryIO | None:
        """Walks from the root one directory at a time, following no symlink on the way or at the end."""
        parts = path.relative_to(self.root).parts
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # nothing stored yet
            return None
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:  # missing, a symlink (ELOOP), or not a directory on the way
            return None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            return None
        return os.fdopen(file_fd, "rb")


ArtifactStore = LocalStore  # the name kiln used before there were two stores


def _move_into(local: Path, path: Path) -> None:
    """Puts a finished local file at `path` atomically: a rename when both are on one filesystem (the scratch
    directory and the default store both live under data_dir), else a copy."""
    with atomic_path(path) as tmp:
        try:
            os.replace(local, tmp)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(local, tmp)
            local.unlink()


# --- S3-compatible object storage ---------------------------------------------------------------------------


class S3Store:
    """Objects under s3://bucket/prefix/, through boto3. Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID
    and AWS_SECRET_ACCESS_KEY, a profile, an instance role), never from kiln's settings."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "") -> None:
        import boto3  # here, not at the top: most of kiln (the CLI, the client) never needs it
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.where = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"},
            # Other servers (MinIO, moto) want path-style URLs and may not know the newer default checksums.
            **({"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required"} if endpoint_url else {}),
        )
        # A session of its own: boto3's default session is not safe to create clients from in several threads.
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
        )

    def open_artifact(self, job_id: str, name: str) -> BinaryIO | None:
        return self._download(artifact_key(job_id, name))

    def open_dataset(self, dataset_id: str) -> BinaryIO | None:
        return self._download(dataset_key(dataset_id))

    def put_dataset(self, dataset_id: str, data: bytes) -> None:
        key = self.prefix + dataset_key(dataset_id)
        with self._errors(f"uploading {key}"):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key)

    def put_artifact(self, job_id: str, name: str, local: Path) -> None:
        self._upload(local, artifact_key(job_id, name))

    def put_checkpoint(self, job_id: str, epoch: int, local: Path) -> None:
        self._upload(local, f"{checkpoints_key(job_id)}/{checkpoint_name(epoch)}")

    def fetch_checkpoint(self, job_id: str, epoch: int, local: Path) -> bool:
        file = self._download(f"{checkpoints_key(job_id)}/{checkpoint_name(epoch)}")
        if file is None:
            return False
        with file, local.open("wb") as out:
            shutil.copyfileobj(file, out, 1 << 20)
        return True

    # Both best effort: a checkpoint left behind costs only storage (the database names the one to resume from),
    # so failing to delete it is logged, not raised.

    def drop_checkpoint(self, job_id: str, epoch: int) -> None:
        """One DELETE (S3 answers it alike whether the key exists), where listing the job's checkpoints to keep one
        took a LIST and a DELETE every epoch."""
        key = f"{self.prefix}{checkpoints_key(job_id)}/{checkpoint_name(epoch)}"
        try:
            with self._errors(f"deleting {key}"):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except StoreUnavailable as exc:
            log.warning("%s", exc)

    def drop_checkpoints(self, job_id: str) -> None:
        directory = f"{self.prefix}{checkpoints_key(job_id)}/"
        try:
            with self._errors(f"deleting the checkpoints under {directory}"):
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                                  Prefix=directory):
                    old = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if old:  # a page holds at most 1000 keys, as many as one delete_objects takes
                        self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old, "Quiet": True})
        except StoreUnavailable as exc:
            log.warning("%s", exc)

    def _upload(self, local: Path, key: str) -> None:
        key = self.prefix + key
        with self._errors(f"uploading {key}"):
            self.client.upload_file(str(local), self.bucket, key)  # multipart above 8 MiB
        local.unlink()

    def _download(self, key: str) -> BinaryIO | None:
        """The object in a temporary file (streamed to disk, not held in memory), or None if there is none.
        A GET, not download_fileobj's HEAD: a HEAD's 404 cannot tell a missing key from a missing bucket."""
        from botocore.exceptions import ClientError

        key = self.prefix + key
        with self._errors(f"reading {key}"):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                    return None
                raise
            file = tempfile.TemporaryFile()  # noqa: SIM115 (returned open: the caller reads and closes it)
            try:
                with body:
                    shutil.copyfileobj(body, file, 1 << 20)
            except BaseException:
                file.close()
                raise
        file.seek(0)
        return file

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """botocore's exceptions as a StoreUnavailable with a sentence an operator can act on."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        try:
            yield
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            cause: Any = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc  # it wraps a ClientError
            code = cause.response.get("Error", {}).get("Code", "") if isinstance(cause, ClientError) else ""
            if code == "NoSuchBucket":
                why = f"the bucket {self.bucket!r} does not exist; create it or fix KILN_S3_BUCKET"
            elif code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken",
                          "InvalidToken"}:
                why = (f"S3 refused kiln's credentials ({code}); check AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY (or the profile or role), and that they may use the bucket")
            elif isinstance(cause, NoCredentialsError | PartialCredentialsError):
                why = "no AWS credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            elif code:
                why = f"S3 answered {code}: {cause.response.get('Error', {}).get('Message', '')}".rstrip(": ")
            else:
                why = f"S3 is unreachable ({cause})"
            raise StoreUnavailable(f"The artifact store {self.where} failed while {doing}: {why}.") from exc
