"""An upload that fails on a full disk gives its space back: every file is closed and the directory
removed, even when closing (which flushes) fails; one failed close left the other handles open and the
partial files in place, so the store stayed full until the control plane restarted."""

from __future__ import annotations

import errno

import pytest

from control_plane.artifacts.upload import ManifestEntry, Upload
from openlora.artifact import ARTIFACT_FILES


class _FailingClose:
    """A file whose close fails as a flush on a full disk does (the data never reached the disk)."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        return self.real.write(data)

    def close(self) -> None:
        self.real.close()  # the descriptor goes, as CPython's close does after a failed flush
        raise OSError(errno.ENOSPC, "No space left on device")


def _upload(tmp_path) -> Upload:
    manifest = {name: ManifestEntry(name, 4) for name in ARTIFACT_FILES}
    upload = Upload(tmp_path / "incoming", manifest)
    for name in ARTIFACT_FILES:
        upload.write(name, 0, b"ab")
    return upload


@pytest.mark.parametrize("failing", range(len(ARTIFACT_FILES)))
def test_abort_closes_every_file_and_removes_the_directory_when_a_close_fails(tmp_path, failing):
    upload = _upload(tmp_path)
    names = sorted(upload._files)
    real = {name: upload._files[name] for name in names}
    upload._files[names[failing]] = _FailingClose(real[names[failing]])
    upload.abort()
    assert all(f.closed for f in real.values())
    assert not upload.directory.exists()


def test_finish_closes_every_file_before_it_reports_a_failed_close(tmp_path):
    upload = _upload(tmp_path)
    names = sorted(upload._files)
    real = {name: upload._files[name] for name in names}
    upload._files[names[0]] = _FailingClose(real[names[0]])
    with pytest.raises(OSError) as failed:
        upload.finish()
    assert failed.value.errno == errno.ENOSPC
    assert all(f.closed for f in real.values())
    upload.abort()
    assert not upload.directory.exists()
