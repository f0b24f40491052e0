"""The upload header's manifest is checked before any byte is stored."""

from __future__ import annotations

import pytest

from control_plane.artifacts.upload import ManifestEntry, check_manifest
from control_plane.errors import InvalidArgument
from openlora.artifact import CONFIG_FILE, WEIGHTS_FILE

LIMIT = 1 << 20
DIGEST = "0123456789abcdef" * 4


def _manifest(weights_sha256: str) -> list[ManifestEntry]:
    return [ManifestEntry(CONFIG_FILE, 100), ManifestEntry(WEIGHTS_FILE, 1000, weights_sha256)]


@pytest.mark.parametrize("declared", ["", DIGEST, DIGEST.upper()])
def test_a_declared_sha256_of_64_hex_digits_or_none_is_taken(declared):
    assert check_manifest(_manifest(declared), LIMIT)[WEIGHTS_FILE].sha256 == declared


@pytest.mark.parametrize(
    "declared", ["abc", DIGEST + "0", DIGEST[:-1] + "g", " " + DIGEST[1:], DIGEST[:-1] + "\n"]
)
def test_a_declared_sha256_that_no_file_can_match_is_refused_with_the_header(declared):
    """It was taken, and the upload refused once every byte had arrived ('does not match its declared
    sha256'), the whole file sent for nothing."""
    with pytest.raises(InvalidArgument) as refused:
        check_manifest(_manifest(declared), LIMIT)
    assert refused.value.field == "files[1].sha256"
    assert "64 hexadecimal digits" in str(refused.value)
