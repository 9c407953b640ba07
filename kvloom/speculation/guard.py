"""Speculation's check on itself: decode steps with drafts against steps without, timed as they run.

The start-up cost curve (step_cost.py) prices a pass from probes over scratch blocks. At 16-32 concurrent
requests it under-priced a decode step by ~40% (26.8 ms seen against 16.5 predicted at 32 rows), so drafts the
curve expected to pay for themselves lost, and lookahead ran at 0.88-0.96x of plain decoding. The guard keeps,
per batch size, a moving average of the tokens a second that decode-only steps produced, with drafts and
without; the time counted is the whole step (scheduling, drafting, the pass, verification). Where drafted steps
measure slower, the batch size stops drafting, and drafts again every PROBE_EVERY steps so that a change
(longer contexts, text that starts repeating) is seen. Drafting never changes a token, only how fast it comes,
so the guard changes speed alone.
"""
from __future__ import annotations

from dataclasses import dataclass

WARM = 4            # samples of each kind before the averages are trusted
PROBE_EVERY = 16    # a batch size that stopped drafting drafts once in this many steps
_DECAY = 0.8        # weight of the past in each average


@dataclass
class _Arm:
    rate: float = 0.0   # tokens a second, moving average
    count: int = 0

    def add(self, rate: float) -> None:
        self.rate = rate if self.count == 0 else _DECAY * self.rate + (1 - _DECAY) * rate
        self.count += 1


@dataclass
class _Bucket:
    plain: _Arm
    drafted: _Arm
    skipped: int = 0    # steps since the last allowed one, while drafting measures slower


class SpeculationGuard:
    def __init__(self):
        self._buckets: dict[int, _Bucket] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        """Batch sizes step costs are compared within: exact up to 8 rows, then in fours."""
        return rows if rows < 8 else rows // 4 * 4

    def _get(self, rows: int) -> _Bucket:
        key = self.bucket(rows)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(_Arm(), _Arm())
        return b

    def allows(self, rows: int) -> bool:
        """May a decode-only step of `rows` requests carry drafts?"""
        b = self._get(rows)
        if b.plain.count < WARM or b.drafted.count < WARM:
            return b.drafted.count <= b.plain.count   # take turns until both averages are trusted
        if b.drafted.rate >= b.plain.rate:
            b.skipped = 0
            return True
        b.skipped += 1
        if b.skipped >= PROBE_EVERY:
            b.skipped = 0
            return True
        return False

    def record(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of `rows` requests produced `tokens` in `seconds`, with drafts or without."""
        if rows <= 0 or seconds <= 0:
            return
        b = self._get(rows)
        (b.drafted if drafted else b.plain).add(tokens / seconds)

    def stats(self) -> dict:
        return {str(k): {"plain_tokens_per_s": round(b.plain.rate, 1), "plain_steps": b.plain.count,
                         "drafted_tokens_per_s": round(b.drafted.rate, 1), "drafted_steps": b.drafted.count}
                for k, b in sorted(self._buckets.items())}
