"""What the engine hands back after each step, per request."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvloom.engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """A request's progress: the delta of this step and the totals so far.

    The deltas of a stream concatenate to the totals. `text` never contains a
    stop string; `token_ids` includes the EOS or stop token that ended it.
    """

    request_id: str
    parent_id: str                     # the id add_request returned; the n samples of a request share it
    index: int                         # which of the n samples
    prompt_token_ids: list[int]
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[TokenLogprobs] | None
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None   # the stop string or token id that ended it
    num_cached_tokens: int = 0             # prompt tokens whose KV came from the prefix cache
    metrics: dict = field(default_factory=dict)
    error: str | None = None               # why the engine ended it, with finish_reason "error"
    cumulative_logprob: float | None = None   # sum of the output tokens' logprobs (when logprobs are asked for)
