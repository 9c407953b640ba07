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

SIZES = (1, 2, 4, 8, 16, 32, 64)


class StepCost:
    """seconds(T tokens in one chunk), plus `per_chunk`: what each further request's chunk adds (its own
    attention call per layer). A decode that carries drafts leaves the batched decode path and becomes
    such a chunk, so giving a request its first draft token costs per_chunk on top of the token."""

    def __init__(self, sizes: list[int], seconds: list[float], per_chunk: float = 0.0):
        self.sizes = list(sizes)
        self.seconds = list(seconds)
        self.per_chunk = per_chunk

    def __call__(self, num_tokens: int) -> float:
        s, t = self.sizes, self.seconds
        if num_tokens <= s[0]:
            return t[0]
        if num_tokens >= s[-1]:   # beyond the last size: linear in tokens, at the last measured rate
            return t[-1] * num_tokens / s[-1]
        i = bisect.bisect_left(s, num_tokens)
        frac = (num_tokens - s[i - 1]) / (s[i] - s[i - 1])
        return t[i - 1] + frac * (t[i] - t[i - 1])

    @classmethod
    def measure(cls, runner, pool, block_size: int, max_tokens: int, repeats: int = 2) -> "StepCost":
        sizes = [n for n in SIZES if n <= max_tokens] or [1]
        blocks = pool.allocate(-(-sizes[-1] // block_size))
        if blocks is None:
            return cls([1], [1.0])
        try:
            seconds = []
            for n in sizes:
                plan = SchedulerOutput(prefills=[ScheduledChunk("step-cost", [0] * n, 0, blocks, sample=True)])
                best = _best_time(runner, plan, repeats)
                seconds.append(max(best, seconds[-1]) if seconds else best)   # noise never makes more cheaper
            # Eight 2-token chunks against one 16-token chunk: the cost of splitting a pass into chunks.
            n = min(8, len(blocks))
            split = SchedulerOutput(prefills=[ScheduledChunk("step-cost", [0, 0], 0, [b], sample=True)
                                              for b in blocks[:n]])
            whole = SchedulerOutput(prefills=[ScheduledChunk("step-cost", [0] * 2 * n, 0, blocks, sample=True)])
            per_chunk = max(0.0, (_best_time(runner, split, repeats) - _best_time(runner, whole, repeats)) / (n - 1)) \
                if n > 1 else 0.0
        finally:
            pool.free(blocks)
        return cls(sizes, seconds, per_chunk)


def _best_time(runner, plan: SchedulerOutput, repeats: int) -> float:
    runner.execute(plan)   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(plan)
        best = min(best, time.perf_counter() - t0)
    return best
