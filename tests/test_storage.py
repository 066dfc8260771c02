"""Artifact paths come from canonical ids only; nothing outside the store is ever served. A worker's writes to
the store ride out an outage shorter than the lease."""

import errno
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.settings import Settings
from kiln.storage import (
    WEIGHTS,
    ArtifactStore,
    LocalStore,
    S3Store,
    Store,
    StoreUnavailable,
    checkpoint_name,
    make_store,
    parse_id,
)
from worker.runner import _retrying


@pytest.mark.parametrize(
    "value",
    ["../etc/passwd", "/etc/passwd", "..%2f..%2fetc", "%252e%252e%252f", "a;b", "x#y", "", "7D0C" + "0" * 28,
     "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4()).upper(), str(uuid.uuid1()), str(uuid.uuid4()) + "/.."],
)
def test_only_canonical_v4_ids_become_paths(tmp_path, value):
    with pytest.raises(ValueError):
        parse_id(value)
    with pytest.raises(ValueError):
        ArtifactStore(tmp_path).path(value, WEIGHTS)


def test_unknown_artifact_names_are_refused(tmp_path):
    with pytest.raises(ValueError):
        ArtifactStore(tmp_path).path(str(uuid.uuid4()), "../../secret")


def test_symlink_planted_in_the_store_is_not_followed_out(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    store = ArtifactStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    store.job_dir(job_id).mkdir(parents=True)
    os.symlink(secret, store.path(job_id, WEIGHTS))
    assert store.open_artifact(job_id, WEIGHTS) is None

    other = str(uuid.uuid4())  # a symlinked directory inside the store, pointing out of it
    os.symlink(tmp_path, store.job_dir(other))
    (tmp_path / WEIGHTS).write_text("outside")
    assert store.open_artifact(other, WEIGHTS) is None

    real = str(uuid.uuid4())
    store.job_dir(real).mkdir(parents=True)
    store.path(real, WEIGHTS).write_bytes(b"weights")
    with store.open_artifact(real, WEIGHTS) as file:
        assert file.read() == b"weights"


def test_local_put_moves_the_file_in_without_a_copy(tmp_path):
    """The worker writes to scratch and hands the file over: on one filesystem that is a rename (same inode)."""
    store = LocalStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    local = scratch / WEIGHTS
    local.write_bytes(b"weights")
    inode = local.stat().st_ino
    store.put_artifact(job_id, WEIGHTS, local)
    assert not local.exists(), "put takes ownership of the local file"
    assert store.path(job_id, WEIGHTS).stat().st_ino == inode
    with store.open_artifact(job_id, WEIGHTS) as file:
        assert file.read() == b"weights"
    assert not list(store.path(job_id, WEIGHTS).parent.glob(".*.tmp")), "no temp file left behind"


def test_local_put_copies_across_filesystems(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    local = tmp_path / "local"
    local.write_bytes(b"ckpt")
    real_replace = os.replace

    def cross_device(src, dst):  # the first rename is scratch -> store: as if they were two filesystems
        if Path(src) == local:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    store.put_checkpoint(job_id, 1, local)
    assert not local.exists() and store.checkpoint_path(job_id, 1).read_bytes() == b"ckpt"


def check_checkpoint_lifecycle(store: Store, job_id: str, tmp_path: Path, stored: Callable[[], set[str]]) -> None:
    """What every store does with a job's checkpoints; `stored()` lists the checkpoint names it holds for the job."""
    for epoch in (1, 2, 3):
        (tmp_path / "c").write_bytes(f"epoch {epoch}".encode())
        store.put_checkpoint(job_id, epoch, tmp_path / "c")
    assert store.fetch_checkpoint(job_id, 2, tmp_path / "fetched")
    assert (tmp_path / "fetched").read_bytes() == b"epoch 2"
    assert checkpoint_name(2) in stored(), "fetching leaves the stored one in place"

    store.drop_checkpoint(job_id, 1)
    store.drop_checkpoint(job_id, 2)
    store.drop_checkpoint(job_id, 7)  # one the store does not hold is not an error
    assert stored() == {"epoch-000003.safetensors"}
    assert not store.fetch_checkpoint(job_id, 2, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
    store.drop_checkpoints(job_id)
    assert stored() == set()
    store.drop_checkpoints(job_id)  # nothing left to drop is not an error


def test_local_checkpoints_fetch_and_drop(tmp_path):
    store = LocalStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    directory = store.checkpoint_dir(job_id)
    check_checkpoint_lifecycle(store, job_id, tmp_path,
                               lambda: {p.name for p in directory.iterdir()} if directory.exists() else set())
    assert not directory.exists()


def test_local_checkpoint_symlink_is_not_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    store = LocalStore(tmp_path / "store")
    job_id = str(uuid.uuid4())
    store.checkpoint_dir(job_id).mkdir(parents=True)
    os.symlink(secret, store.checkpoint_path(job_id, 1))
    assert not store.fetch_checkpoint(job_id, 1, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_local_dataset_put_and_open(tmp_path):
    store = LocalStore(tmp_path / "store")
    dataset_id = str(uuid.uuid4())
    assert store.open_dataset(dataset_id) is None
    store.put_dataset(dataset_id, b"arrays")
    with store.open_dataset(dataset_id) as file:
        assert file.read() == b"arrays"
    with pytest.raises(ValueError):
        store.put_dataset("../../etc", b"x")


def test_make_store_picks_by_settings(tmp_path):
    local = make_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "artifacts").resolve()
    s3 = make_store(Settings(data_dir=tmp_path, s3_bucket="kiln-artifacts", s3_endpoint_url="http://127.0.0.1:9"))
    assert isinstance(s3, S3Store) and s3.bucket == "kiln-artifacts"  # nothing is contacted until it is used


@pytest.mark.parametrize("prefix", ["/abs", "a/../b", "..", "a\nb", "tab\there"])
def test_s3_prefix_is_validated(prefix):
    with pytest.raises(ValidationError, match="KILN_S3_PREFIX"):
        Settings(s3_prefix=prefix)
    assert Settings(s3_prefix="kiln/prod/").s3_prefix == "kiln/prod"


def _failing(times: int, error: Exception) -> Callable[[], str]:
    """A store write that fails `times` times (-1: always), then returns "stored"."""
    calls = 0

    def write() -> str:
        nonlocal calls
        calls += 1
        if times < 0 or calls <= times:
            raise error
        return "stored"

    return write


DOWN = "The artifact store s3://b/ failed while writing: S3 is unreachable."


def test_a_store_write_rides_out_an_outage_shorter_than_the_lease(tmp_path):
    settings = Settings(data_dir=tmp_path, lease_s=5, heartbeat_s=1)
    assert _retrying(_failing(2, StoreUnavailable(DOWN)), settings, "storing the weights") == "stored"


def test_a_store_down_for_the_whole_lease_fails_with_its_sentence_and_how_long(tmp_path):
    settings = Settings(data_dir=tmp_path, lease_s=1, heartbeat_s=0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        _retrying(_failing(-1, StoreUnavailable(DOWN)), settings, "storing the weights")
    assert time.monotonic() - started >= 0.5  # retried, not given up at the first failure
    assert str(raised.value) == f"{DOWN} Still failing after 1 s of retries."
