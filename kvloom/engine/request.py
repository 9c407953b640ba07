"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum

import torch

from kvloom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"


class Request:
    """Tokens so far (prompt + output) and how many of them have KV in the pool.

    There is no prefill or decode phase: each step moves num_computed_tokens
    toward len(all_token_ids); when it gets there, a token is sampled. A
    preempted request drops its blocks and starts again from zero.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, arrival_time: float, generator: torch.Generator | None,
                 parent_id: str | None = None, index: int = 0, session_id: str | None = None,
                 cache_salt: bytes = b"", priority: int = 0):
        self.request_id = request_id
        self.parent_id = parent_id or request_id   # the caller's id; n samples share it
        self.index = index                         # which of the n samples this is
        self.session_id = session_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens          # resolved: never runs past the model's context
        self.arrival_time = arrival_time
        # Scheduling order: (priority, arrival time, the scheduler's admission count), lower first. Set by
        # Scheduler.add; portable, since a moved request keeps its priority and arrival time.
        self.order: tuple[int, float, int] = (priority, arrival_time, 0)
        self.priority = priority              # lower is more urgent (vLLM's semantics)
        self.cache_salt = cache_salt          # part of every block key: tenants' caches never mix
        self.generator = generator            # per-request RNG: batch-independent sampling
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_keys: list[bytes] = []     # content keys of the full computed blocks (prefix cache)
        self.window_first = -1                # sliding-window KV (kv/window_pages.py): the first block whose
                                              # sliding pages it holds (through its last); -1: none held
        self.num_cached_tokens = 0                # prompt tokens found in the prefix cache at admission
        self.status = RequestStatus.WAITING
        self.queued_front = False       # waits at the front of its priority class (it ran, or moved in)
        self.paused = False             # a search holds it between rounds: never scheduled, preempted first
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.matcher = None                   # kvloom/structured: its grammar state, when its output is constrained
        self.lora_name: str | None = None     # the LoRA adapter it runs with (kvloom/lora), None: the base model
        self.lora_slot = -1                   # the adapter's slot while the request runs (the scheduler pins it)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, n: int) -> None:
        """Keep the first n output tokens (a stop came in the middle of several accepted at once)."""
        del self.output_token_ids[n:]
        del self.all_token_ids[self.num_prompt_tokens + n:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens - 1)
