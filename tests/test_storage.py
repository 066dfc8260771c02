"""Artifact paths come from canonical ids only; nothing outside the store is ever served."""

import os
import uuid

import pytest

from kiln.storage import WEIGHTS, ArtifactStore, parse_id


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
    assert store.open_artifact(real, WEIGHTS) == store.path(real, WEIGHTS)
