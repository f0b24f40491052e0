from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MixMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIX_METHOD_UNSPECIFIED: _ClassVar[MixMethod]
    MIX_METHOD_LINEAR: _ClassVar[MixMethod]
    MIX_METHOD_TIES: _ClassVar[MixMethod]
    MIX_METHOD_DARE_LINEAR: _ClassVar[MixMethod]
    MIX_METHOD_DARE_TIES: _ClassVar[MixMethod]
    MIX_METHOD_MAGNITUDE_PRUNE: _ClassVar[MixMethod]
    MIX_METHOD_ENSEMBLE: _ClassVar[MixMethod]

class EnsembleCombine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENSEMBLE_COMBINE_UNSPECIFIED: _ClassVar[EnsembleCombine]
    ENSEMBLE_COMBINE_PROBS: _ClassVar[EnsembleCombine]
    ENSEMBLE_COMBINE_LOGPROBS: _ClassVar[EnsembleCombine]

class MajoritySignMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAJORITY_SIGN_METHOD_UNSPECIFIED: _ClassVar[MajoritySignMethod]
    MAJORITY_SIGN_METHOD_TOTAL: _ClassVar[MajoritySignMethod]
    MAJORITY_SIGN_METHOD_FREQUENCY: _ClassVar[MajoritySignMethod]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_UNSPECIFIED: _ClassVar[CacheTier]
    CACHE_TIER_NONE: _ClassVar[CacheTier]
    CACHE_TIER_DEVICE: _ClassVar[CacheTier]
    CACHE_TIER_HOST: _ClassVar[CacheTier]
    CACHE_TIER_DISK: _ClassVar[CacheTier]
    CACHE_TIER_REMOTE: _ClassVar[CacheTier]
MIX_METHOD_UNSPECIFIED: MixMethod
MIX_METHOD_LINEAR: MixMethod
MIX_METHOD_TIES: MixMethod
MIX_METHOD_DARE_LINEAR: MixMethod
MIX_METHOD_DARE_TIES: MixMethod
MIX_METHOD_MAGNITUDE_PRUNE: MixMethod
MIX_METHOD_ENSEMBLE: MixMethod
ENSEMBLE_COMBINE_UNSPECIFIED: EnsembleCombine
ENSEMBLE_COMBINE_PROBS: EnsembleCombine
ENSEMBLE_COMBINE_LOGPROBS: EnsembleCombine
MAJORITY_SIGN_METHOD_UNSPECIFIED: MajoritySignMethod
MAJORITY_SIGN_METHOD_TOTAL: MajoritySignMethod
MAJORITY_SIGN_METHOD_FREQUENCY: MajoritySignMethod
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
CACHE_TIER_UNSPECIFIED: CacheTier
CACHE_TIER_NONE: CacheTier
CACHE_TIER_DEVICE: CacheTier
CACHE_TIER_HOST: CacheTier
CACHE_TIER_DISK: CacheTier
CACHE_TIER_REMOTE: CacheTier

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    repetition_penalty: float
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class AdapterWeight(_message.Message):
    __slots__ = ("adapter", "weight")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    weight: float
    def __init__(self, adapter: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "adapter", "prompt", "prompt_token_ids", "sampling", "logprobs", "mix", "mix_method", "density", "majority_sign_method", "combine")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MIX_FIELD_NUMBER: _ClassVar[int]
    MIX_METHOD_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    logprobs: bool
    mix: _containers.RepeatedCompositeFieldContainer[AdapterWeight]
    mix_method: MixMethod
    density: float
    majority_sign_method: MajoritySignMethod
    combine: EnsembleCombine
    def __init__(self, request_id: _Optional[str] = ..., adapter: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., logprobs: _Optional[bool] = ..., mix: _Optional[_Iterable[_Union[AdapterWeight, _Mapping]]] = ..., mix_method: _Optional[_Union[MixMethod, str]] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[_Union[MajoritySignMethod, str]] = ..., combine: _Optional[_Union[EnsembleCombine, str]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "adapter_load_ms", "ttft_ms", "cache_tier", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TIER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    adapter_load_ms: float
    ttft_ms: float
    cache_tier: CacheTier
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., adapter_load_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., cache_tier: _Optional[_Union[CacheTier, str]] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "logprobs", "finish_reason", "usage", "timing")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...
