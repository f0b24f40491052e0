"""BlockManager: fixed-size KV blocks, a free list, and each sequence's block table.

Freed blocks are also queued for clearing (`take_freed`): the model runner zeroes them before the next
forward pass, so a block a sequence receives holds zeros beyond what it writes. The CPU decode attention
reads the unwritten tail of a sequence's last block under a mask, and a masked NaN or infinity (left by a
request whose adapter or mix overflowed) would still poison the softmax of whoever got the block next.
"""

from __future__ import annotations

from collections import deque

from data_plane.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._freed: list[int] = []  # freed since the last take_freed(), to be zeroed

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that `num_new_tokens` more tokens of `seq` fit."""
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate without can_allocate: need {needed}, have {len(self._free)}")
        seq.block_ids.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_ids)
        self._freed.extend(seq.block_ids)
        seq.block_ids = []

    def take_freed(self) -> list[int]:
        """The blocks freed since the last call (each once), for the runner to zero."""
        freed, self._freed = self._freed, []
        return freed
