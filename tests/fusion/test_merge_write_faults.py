"""A merge whose files cannot be written (its directory unwritable, out of space: safetensors raises its own
error then) is this worker's disk fault, UNAVAILABLE and retryable; it failed the call as INTERNAL."""

from __future__ import annotations

import errno

import grpc
import pytest
from safetensors import SafetensorError

from data_plane.fusion import builder
from data_plane.fusion.builder import MergeWriteError, build_merge
from data_plane.server.errors import status_for
from tests.fusion.merge_support import shared_model, spec_of


@pytest.fixture(scope="session")
def merge_model(tmp_path_factory):
    return shared_model(tmp_path_factory)


def _spec(model):
    return spec_of(model, {"r8_all": 0.5, "r4_qv": 0.5}, "ties", density=0.5)


def test_a_directory_that_cannot_be_made_is_a_write_error(merge_model, tmp_path):
    blocker = tmp_path / "merges"
    blocker.write_text("a file where the merges directory should be")
    with pytest.raises(MergeWriteError):
        build_merge(_spec(merge_model), blocker / "key", 64)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: No space left"),
    ],
)
def test_a_failed_write_is_a_write_error_and_leaves_nothing(merge_model, tmp_path, monkeypatch, failure):
    def save_file(*args, **kwargs):
        raise failure

    monkeypatch.setattr(builder, "save_file", save_file)
    with pytest.raises(MergeWriteError) as failed:
        build_merge(_spec(merge_model), tmp_path / "merges" / "key", 64)
    assert list((tmp_path / "merges").iterdir()) == []  # the partial directory is removed
    code, message = status_for(failed.value)
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in message
