import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from openlora.v1 import admin_pb2 as _admin_pb2
from openlora.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BaseModelSpec(_message.Message):
    __slots__ = ("name", "fingerprint", "architecture", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., intermediate_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "base_model", "max_lora_rank", "num_adapter_slots", "instance_id", "previous_instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    base_model: BaseModelSpec
    max_lora_rank: int
    num_adapter_slots: int
    instance_id: str
    previous_instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., base_model: _Optional[_Union[BaseModelSpec, _Mapping]] = ..., max_lora_rank: _Optional[int] = ..., num_adapter_slots: _Optional[int] = ..., instance_id: _Optional[str] = ..., previous_instance_id: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker_id", "heartbeat_interval_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    heartbeat_interval_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "running_requests", "waiting_requests", "resident_adapter_sha256", "weight_format", "weight_bits_per_weight", "resident_weight_bytes", "instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    running_requests: int
    waiting_requests: int
    resident_adapter_sha256: _containers.RepeatedScalarFieldContainer[str]
    weight_format: str
    weight_bits_per_weight: float
    resident_weight_bytes: int
    instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., resident_adapter_sha256: _Optional[_Iterable[str]] = ..., weight_format: _Optional[str] = ..., weight_bits_per_weight: _Optional[float] = ..., resident_weight_bytes: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("api_key", "adapters", "base_model")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    base_model: str
    def __init__(self, api_key: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., base_model: _Optional[str] = ...) -> None: ...

class ResolvedAdapter(_message.Message):
    __slots__ = ("name", "adapter_id", "sha256", "size_bytes", "rank", "alpha", "use_rslora", "keep_warm", "updated_at", "mix", "cache_scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    KEEP_WARM_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    MIX_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    adapter_id: str
    sha256: str
    size_bytes: int
    rank: int
    alpha: float
    use_rslora: bool
    keep_warm: bool
    updated_at: _timestamp_pb2.Timestamp
    mix: ResolvedMix
    cache_scope: str
    def __init__(self, name: _Optional[str] = ..., adapter_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., keep_warm: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mix: _Optional[_Union[ResolvedMix, _Mapping]] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class ResolvedMixMember(_message.Message):
    __slots__ = ("adapter", "weight")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter: ResolvedAdapter
    weight: float
    def __init__(self, adapter: _Optional[_Union[ResolvedAdapter, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class ResolvedMix(_message.Message):
    __slots__ = ("members", "method", "density", "majority_sign_method", "combine")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[ResolvedMixMember]
    method: _inference_pb2.MixMethod
    density: float
    majority_sign_method: _inference_pb2.MajoritySignMethod
    combine: _inference_pb2.EnsembleCombine
    def __init__(self, members: _Optional[_Iterable[_Union[ResolvedMixMember, _Mapping]]] = ..., method: _Optional[_Union[_inference_pb2.MixMethod, str]] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[_Union[_inference_pb2.MajoritySignMethod, str]] = ..., combine: _Optional[_Union[_inference_pb2.EnsembleCombine, str]] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("tenant_id", "tenant", "scopes", "adapters", "cache_ttl_ms", "api_key_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    tenant: str
    scopes: _containers.RepeatedScalarFieldContainer[_admin_pb2.Scope]
    adapters: _containers.RepeatedCompositeFieldContainer[ResolvedAdapter]
    cache_ttl_ms: int
    api_key_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., tenant: _Optional[str] = ..., scopes: _Optional[_Iterable[_Union[_admin_pb2.Scope, str]]] = ..., adapters: _Optional[_Iterable[_Union[ResolvedAdapter, _Mapping]]] = ..., cache_ttl_ms: _Optional[int] = ..., api_key_id: _Optional[str] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class FetchArtifactResponse(_message.Message):
    __slots__ = ("filename", "offset", "data", "file_size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    offset: int
    data: bytes
    file_size_bytes: int
    def __init__(self, filename: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., file_size_bytes: _Optional[int] = ...) -> None: ...

class UsageAdapter(_message.Message):
    __slots__ = ("adapter_id", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("request_id", "tenant_id", "adapters", "worker_id", "base_model", "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "total_ms", "finished_at", "finish_reason", "request_kind", "mix_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KIND_FIELD_NUMBER: _ClassVar[int]
    MIX_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    adapters: _containers.RepeatedCompositeFieldContainer[UsageAdapter]
    worker_id: str
    base_model: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    ttft_ms: float
    total_ms: float
    finished_at: _timestamp_pb2.Timestamp
    finish_reason: str
    request_kind: str
    mix_name: str
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[UsageAdapter, _Mapping]]] = ..., worker_id: _Optional[str] = ..., base_model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finish_reason: _Optional[str] = ..., request_kind: _Optional[str] = ..., mix_name: _Optional[str] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("inserted", "duplicates")
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    inserted: int
    duplicates: int
    def __init__(self, inserted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class CheckRequestIdRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckRequestIdResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequestIdRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id", "worker_id", "ttl_ms")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    worker_id: str
    ttl_ms: int
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ReserveRequestIdResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequestIdsRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ReserveRequestIdRequest]
    def __init__(self, entries: _Optional[_Iterable[_Union[ReserveRequestIdRequest, _Mapping]]] = ...) -> None: ...

class RequestIdOutcome(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ReserveRequestIdsResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[RequestIdOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[RequestIdOutcome, _Mapping]]] = ...) -> None: ...

class ReleaseRequestIdRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id", "worker_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    worker_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ReleaseRequestIdResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class RequestIdKey(_message.Message):
    __slots__ = ("tenant_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseWorkerRequestIdsRequest(_message.Message):
    __slots__ = ("worker_id", "keep")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    keep: _containers.RepeatedCompositeFieldContainer[RequestIdKey]
    def __init__(self, worker_id: _Optional[str] = ..., keep: _Optional[_Iterable[_Union[RequestIdKey, _Mapping]]] = ...) -> None: ...

class ReleaseWorkerRequestIdsResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("api_key", "base_model", "page_size", "page_token")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    base_model: str
    page_size: int
    page_token: str
    def __init__(self, api_key: _Optional[str] = ..., base_model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("name", "kind", "owned_by", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    owned_by: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., owned_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
