"""Helpers to build raw UploadAdapter streams, including malformed ones."""

from __future__ import annotations

from pathlib import Path

from openlora.v1 import admin_pb2, admin_pb2_grpc


def raw_upload(
    cp,
    files: list[tuple[str, bytes]],
    name: str = "raw",
    base_model: str = "tiny-llama",
    declared_sizes: dict[str, int] | None = None,
    key: str | None = None,
    with_header: bool = True,
) -> admin_pb2.UploadAdapterResponse:
    """Sends `files` as given (names unchecked), declaring `declared_sizes` (default: the real sizes);
    without the header message when `with_header` is false."""
    import grpc

    declared_sizes = declared_sizes or {}
    header = admin_pb2.UploadAdapterHeader(name=name, base_model=base_model)
    for filename, data in files:
        header.files.add(filename=filename, size_bytes=declared_sizes.get(filename, len(data)))

    def stream():
        if with_header:
            yield admin_pb2.UploadAdapterRequest(header=header)
        for filename, data in files:
            for offset in range(0, max(len(data), 1), 1 << 16):
                yield admin_pb2.UploadAdapterRequest(
                    chunk=admin_pb2.FileChunk(
                        filename=filename, offset=offset, data=data[offset : offset + (1 << 16)]
                    )
                )

    stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cp.target))
    return stub.UploadAdapter(
        stream(), metadata=(("authorization", f"Bearer {key or cp.admin_key}"),), timeout=60
    )


def dir_files(directory: Path) -> list[tuple[str, bytes]]:
    return [(n, (directory / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")]
