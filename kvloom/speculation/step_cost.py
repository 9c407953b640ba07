"""How long a forward pass of T tokens takes on this machine: the cost side of speculation.

Measured once at start-up (a few passes over scratch blocks) and interpolated
linearly between the measured sizes. On a CPU at small batch a pass is
bound by reading the weights, so 8 tokens cost little more than 1; once the
batch is compute-bound every extra token costs its share, and guessing
tokens that may be rejected stops paying.
"""
from __future__ import annotations

import bisect
import time

from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvloom.kv.window_pages import allocate_scratch, free_scratch

SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 512   # context length of the rows that measure attention's share (at most half the model's)


class StepCost:
    """seconds(T tokens in one chunk), plus `per_chunk`: what each further request's chunk adds (its own
    attention call per layer). A decode that carries drafts leaves the batched decode path and becomes
    such a chunk, so giving a request its first draft token costs per_chunk on top of the token.

    decode_only(B): a step of B rows that the native decode stack runs (kvloom/models/decode_stack.py):
    plain decodes, and the rows of short draft trees riding with them, each row costing like a decode;
    about half the module path's time at batch 1."""

    def __init__(self, sizes: list[int], seconds: list[float], per_chunk: float = 0.0,
                 decode_sizes: list[int] | None = None, decode_seconds: list[float] | None = None,
                 per_context_token: float = 0.0):
        self.sizes = list(sizes)
        self.seconds = list(seconds)
        self.per_chunk = per_chunk
        self.decode_sizes = list(decode_sizes or sizes)
        self.decode_seconds = list(decode_seconds or seconds)
        # Attention of one stack row per token of its context: a draft row reads its request's whole
        # context again (~0.4 ms a row at 200 tokens here), which the curves above, measured over
        # one-block contexts, do not contain.
        self.per_context_token = per_context_token

    def __call__(self, num_tokens: int) -> float:
        return _interpolate(self.sizes, self.seconds, num_tokens)

    def decode_only(self, num_decodes: int) -> float:
        return _interpolate(self.decode_sizes, self.decode_seconds, num_decodes)

    @classmethod
    def measure(cls, runner, pool, block_size: int, max_tokens: int, repeats: int = 2) -> "StepCost":
        sizes = [n for n in SIZES if n <= max_tokens] or [1]
        needed = -(-sizes[-1] // block_size)
        context = min(CONTEXT, runner.model.shape.max_position_embeddings // 2)
        window = getattr(runner, "window_pages", None)   # sliding layers' pages come along (kv/window_pages.py)
        blocks = (allocate_scratch(pool, window, max(needed, -(-context // block_size)))
                  or allocate_scratch(pool, window, needed))
        if blocks is None:
            return cls([1], [1.0])
        try:
            seconds = _curve(runner, sizes, repeats, lambda n: SchedulerOutput(
                spans=[ScheduledChunk("step-cost", [0] * n, 0, blocks, sample=True)]))
            decode_seconds, per_context_token = None, 0.0
            if getattr(runner, "decode_stack", None) is not None:
                decode_seconds = _curve(runner, sizes, repeats, lambda n: SchedulerOutput(
                    decodes=[ScheduledChunk(f"step-cost-{i}", [0], 0, blocks[:1], sample=True) for i in range(n)]))
                if len(blocks) * block_size >= context:   # 8 rows over `context` tokens each against 8 over one
                    def rows(start: int) -> SchedulerOutput:
                        return SchedulerOutput(decodes=[ScheduledChunk(f"step-cost-{i}", [0], start, blocks,
                                                                       sample=True) for i in range(8)])
                    extra = _best_time(runner, rows(context - 1), repeats) - _best_time(runner, rows(0), repeats)
                    per_context_token = max(0.0, extra / (8 * (context - 1)))
            # Eight 2-token chunks against one 16-token chunk: the cost of splitting a pass into chunks.
            n = min(8, len(blocks))
            split = SchedulerOutput(spans=[ScheduledChunk("step-cost", [0, 0], 0, [b], sample=True)
                                              for b in blocks[:n]])
            whole = SchedulerOutput(spans=[ScheduledChunk("step-cost", [0] * 2 * n, 0, blocks, sample=True)])
            per_chunk = max(0.0, (_best_time(runner, split, repeats) - _best_time(runner, whole, repeats)) / (n - 1)) \
                if n > 1 else 0.0
        finally:
            free_scratch(pool, window, blocks)
        return cls(sizes, seconds, per_chunk, sizes if decode_seconds else None, decode_seconds, per_context_token)


def _interpolate(sizes: list[int], seconds: list[float], n: int) -> float:
    if n <= sizes[0]:
        return seconds[0]
    if n >= sizes[-1]:   # beyond the last size: linear in tokens, at the last measured rate
        return seconds[-1] * n / sizes[-1]
    i = bisect.bisect_left(sizes, n)
    frac = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
    return seconds[i - 1] + frac * (seconds[i] - seconds[i - 1])


def _curve(runner, sizes: list[int], repeats: int, plan_of) -> list[float]:
    seconds: list[float] = []
    for n in sizes:
        best = _best_time(runner, plan_of(n), repeats)
        seconds.append(max(best, seconds[-1]) if seconds else best)   # noise never makes more cheaper
    return seconds


def _best_time(runner, plan: SchedulerOutput, repeats: int) -> float:
    runner.logits(plan)   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.logits(plan)
        best = min(best, time.perf_counter() - t0)
    return best
