"""Sequence: the scheduler's view of one request (tokens, KV progress, blocks, adapter).

An ensemble of K members is K sequences of one group (`group`, shared by its members, in member order):
the same tokens, each with its own adapter and its own KV blocks. The scheduler moves a group as a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt then generated tokens
    num_prompt_tokens: int
    adapter_key: str | None = None  # None: the base model
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    holds_adapter: bool = False  # a reference on adapter_key is held in the adapter cache
    num_preemptions: int = 0
    # The sequences of this one's ensemble, itself included (None: a sequence on its own).
    group: list[Sequence] | None = field(default=None, repr=False)
    tenant: str = ""  # who asked: the scheduler admits waiting work fairly across tenants

    @property
    def members(self) -> list[Sequence]:
        """The sequences that are scheduled with this one as a unit: its group, else itself."""
        return self.group if self.group is not None else [self]

    @property
    def is_leader(self) -> bool:
        """True for a sequence on its own and for the first member of a group."""
        return self.group is None or self.group[0] is self

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens
