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
    def __init__(self, sizes: list[int], seconds: list[float]):
        self.sizes = list(sizes)
        self.seconds = list(seconds)

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
                runner.execute(plan)   # warm-up
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    runner.execute(plan)
                    best = min(best, time.perf_counter() - t0)
                seconds.append(max(best, seconds[-1]) if seconds else best)   # noise never makes more cheaper
        finally:
            pool.free(blocks)
        return cls(sizes, seconds)
