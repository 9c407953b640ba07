"""The plan one step executes: the only thing between the scheduler and the model runner."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledChunk:
    """One request's share of a forward pass."""

    request_id: str
    token_ids: list[int]      # tokens fed this step: all_token_ids[start_pos : start_pos + len]
    start_pos: int            # position of token_ids[0] (= tokens already in the KV pool)
    block_ids: list[int]      # the request's whole block table, covering start_pos + len tokens
    sample: bool              # the last token's logits produce the next token
    num_draft_tokens: int = 0  # trailing speculative tokens: written to the pool, not yet committed
    draft_parents: list[int] | None = None  # each draft token's parent among the drafts (-1: the last committed)
    lora_slot: int = -1       # the LoRA adapter slot its rows use (kvloom/lora/tables.py), -1: the base model


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)   # one token each, batched first
    # Chunks that each get their own attention call, after the decodes: prompt chunks, and decodes
    # carrying draft tokens (a short chunk with a tree mask).
    spans: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)            # request ids sent back to waiting
    copies: list[tuple[int, int]] = field(default_factory=list)   # (src, dst) blocks to copy before the pass

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.spans

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(c.token_ids) for c in self.spans)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.spans
