"""A small typed client for the control plane's AdminService (used by the CLI; usable from scripts).

    client = AdminClient("127.0.0.1:50051", api_key)
    client.upload_adapter("out/sql-lora", name="sql", base_model="demo")
    for adapter in client.list_adapters(): print(adapter.name)

Methods return the protobuf messages of `openlora.v1.admin_pb2` and raise `grpc.RpcError` with the
server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from openlora.adapter_format import IGNORED_FILES
from openlora.artifact import ARTIFACT_FILES
from openlora.grpc_reconnect import reconnect_options
from openlora.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from openlora.wire import message

UPLOAD_CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 8 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UploadRefused(ValueError):
    """The directory cannot be uploaded (checked before anything is sent)."""


def adapter_files(directory: str | Path) -> list[Path]:
    """The two PEFT files of an adapter directory; README.md and other non-weight files are skipped, and a
    pickle file anywhere in it refuses the whole directory (it is never opened). Each file is checked to be
    a regular file this process can open: one that could not be read once the upload stream had started
    (a directory named adapter_config.json, a file of another user) ended it as `UNKNOWN: Exception
    iterating requests!`, naming no file."""
    root = Path(directory)
    if not root.is_dir():
        raise UploadRefused(f"{root} is not a directory")
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError as error:
        raise UploadRefused(f"{root} cannot be read: {error.strerror}") from None
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UploadRefused(f"refusing pickle files {pickles}: save the adapter with safetensors")
    missing = [n for n in ARTIFACT_FILES if n not in names]
    if missing:
        raise UploadRefused(f"{root} lacks {missing}")
    files = [root / n for n in ARTIFACT_FILES if n not in IGNORED_FILES]
    for path in files:
        if not path.is_file():  # checked first: opening a FIFO would wait for a writer
            raise UploadRefused(f"{path} is not a regular file")
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise UploadRefused(f"{path} cannot be read: {error.strerror}") from None
    return files


def upload_requests(
    header: admin_pb2.UploadAdapterHeader, files: list[Path], chunk_bytes: int = UPLOAD_CHUNK_BYTES
) -> Iterator[admin_pb2.UploadAdapterRequest]:
    """The UploadAdapter stream: the header (its manifest filled from `files`), then each file in chunks."""
    del header.files[:]
    for path in files:
        header.files.add(filename=path.name, size_bytes=path.stat().st_size)
    yield admin_pb2.UploadAdapterRequest(header=header)
    for path in files:
        with open(path, "rb") as f:
            offset = 0
            while data := f.read(chunk_bytes):
                yield admin_pb2.UploadAdapterRequest(
                    chunk=admin_pb2.FileChunk(filename=path.name, offset=offset, data=data)
                )
                offset += len(data)


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class AdminClient:
    def __init__(self, target: str, api_key: str, timeout_s: float = 60.0) -> None:
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *reconnect_options(),
            ],
        )
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request):
        return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout_s)

    def create_tenant(self, name: str) -> admin_pb2.Tenant:
        return self._call("CreateTenant", admin_pb2.CreateTenantRequest(name=name)).tenant

    def create_api_key(self, tenant: str = "", admin: bool = False) -> admin_pb2.CreateApiKeyResponse:
        scopes = [admin_pb2.SCOPE_INFER, admin_pb2.SCOPE_ADMIN] if admin else [admin_pb2.SCOPE_INFER]
        return self._call("CreateApiKey", admin_pb2.CreateApiKeyRequest(tenant=tenant, scopes=scopes))

    def revoke_api_key(self, key_id: str) -> admin_pb2.ApiKey:
        return self._call("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(key_id=key_id)).key

    def upload_adapter(
        self,
        directory: str | Path,
        name: str,
        base_model: str,
        public: bool = False,
        tenant: str = "",
        royalty_micros_per_million_tokens: int = 0,
        keep_warm: bool = False,
        description: str = "",
    ) -> admin_pb2.UploadAdapterResponse:
        header = message(
            admin_pb2.UploadAdapterHeader,
            name=name,
            visibility=admin_pb2.VISIBILITY_PUBLIC if public else admin_pb2.VISIBILITY_PRIVATE,
            base_model=base_model,
            tenant=tenant,
            royalty_micros_per_million_tokens=royalty_micros_per_million_tokens,
            keep_warm=keep_warm,
            description=description,
        )
        return self._stub.UploadAdapter(
            upload_requests(header, adapter_files(directory)),
            metadata=self._metadata,
            timeout=self._timeout_s,
        )

    def get_adapter(self, name: str, tenant: str = "") -> admin_pb2.Adapter:
        return self._call("GetAdapter", admin_pb2.GetAdapterRequest(name=name, tenant=tenant)).adapter

    def list_adapters(
        self, tenant: str = "", include_public: bool = False, page_size: int = 100
    ) -> Iterator[admin_pb2.Adapter]:
        """Every adapter, following the pages."""
        token = ""
        while True:
            page = self._call(
                "ListAdapters",
                admin_pb2.ListAdaptersRequest(
                    tenant=tenant, page_size=page_size, page_token=token, include_public=include_public
                ),
            )
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def delete_adapter(self, name: str, tenant: str = "") -> admin_pb2.Adapter:
        return self._call("DeleteAdapter", admin_pb2.DeleteAdapterRequest(name=name, tenant=tenant)).adapter

    def get_usage(
        self, tenant: str = "", start: datetime | None = None, end: datetime | None = None
    ) -> admin_pb2.GetUsageResponse:
        return self._call(
            "GetUsage", admin_pb2.GetUsageRequest(tenant=tenant, start=_timestamp(start), end=_timestamp(end))
        )

    def get_invoice(self, period: str, tenant: str = "") -> admin_pb2.Invoice:
        return self._call("GetInvoice", admin_pb2.GetInvoiceRequest(tenant=tenant, period=period)).invoice

    def list_workers(self) -> list[admin_pb2.Worker]:
        return list(self._call("ListWorkers", admin_pb2.ListWorkersRequest()).workers)

    def set_price(
        self,
        base_model: str,
        prompt_micros_per_million_tokens: int,
        completion_micros_per_million_tokens: int,
    ) -> None:
        self._call(
            "SetPrice",
            message(
                admin_pb2.SetPriceRequest,
                base_model=base_model,
                prompt_micros_per_million_tokens=prompt_micros_per_million_tokens,
                completion_micros_per_million_tokens=completion_micros_per_million_tokens,
            ),
        )

    def create_mix(
        self,
        name: str,
        members: list[tuple[str, float]],
        method: str = "linear",
        density: float | None = None,
        majority_sign_method: str | None = None,
        combine: str | None = None,
        tenant: str = "",
        description: str = "",
    ) -> admin_pb2.Mix:
        """Saves a mix under `name`: `members` are (adapter name, weight), "" the base model (ensembles);
        `method` is one of linear, ties, dare_linear, dare_ties, magnitude_prune, ensemble; the options
        (density, majority_sign_method: total | frequency, combine: probs | logprobs) left None take
        their defaults."""
        sign = majority_sign_method
        request = message(
            admin_pb2.CreateMixRequest,
            name=name,
            tenant=tenant,
            members=[
                message(inference_pb2.AdapterWeight, f"members[{i}].", adapter=a, weight=w)
                for i, (a, w) in enumerate(members)
            ],
            method=inference_pb2.MixMethod.Value(f"MIX_METHOD_{method.upper()}"),
            density=density,
            majority_sign_method=(
                inference_pb2.MajoritySignMethod.Value(f"MAJORITY_SIGN_METHOD_{sign.upper()}") if sign else 0
            ),
            combine=inference_pb2.EnsembleCombine.Value(f"ENSEMBLE_COMBINE_{combine.upper()}")
            if combine
            else 0,
            description=description,
        )
        return self._call("CreateMix", request).mix

    def list_mixes(self, tenant: str = "") -> list[admin_pb2.Mix]:
        return list(self._call("ListMixes", admin_pb2.ListMixesRequest(tenant=tenant)).mixes)

    def delete_mix(self, name: str, tenant: str = "") -> admin_pb2.Mix:
        return self._call("DeleteMix", admin_pb2.DeleteMixRequest(name=name, tenant=tenant)).mix
