"""What one executed step hands back to the engine: tokens, never logits.

The runner samples (sampling lives with the model, so an engine in another process
ships a few ids per request instead of a vocabulary-wide row of logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvloom.engine.sampler import TokenLogprobs


@dataclass
class ModelRunnerOutput:
    # Per request that sampled this step (forked samples included), in plan order: the tokens to
    # append (one, or several when drafts were accepted) and their logprobs (None where not asked).
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    # Drafted requests: the accepted draft indices, and how many accepted drafts already sit in
    # their right KV slots (the leading run of the first branch).
    draft_paths: dict[str, list[int]] = field(default_factory=dict)
    kept_drafts: dict[str, int] = field(default_factory=dict)
    # Requests whose logits were not finite (NaN or inf): they end with an error, never with a token.
    failed: dict[str, str] = field(default_factory=dict)
