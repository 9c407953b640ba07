"""Which running requests to move, and where: Llumnix's migration triggers as a pure function of load reports.

plan_moves(loads) -> [Move], at most one move out of each instance per round (a move changes the loads the
next round sees), in this order of urgency:

  drain        a draining instance: each of its requests goes to the freest instance that has room;
  make room    an instance whose first queued request does not fit its free blocks: when another instance
               can take that request as it is (it never ran, so it moves without KV), it goes there;
               otherwise running requests of lower or equal priority move out, smallest first, until it
               fits ("priority" when the queued request is more urgent than them, else "defrag");
  imbalance    the least free instance (Llumnix's freeness) sends one request to the freest when their
               freeness differs by more than `imbalance_gap` and the move narrows the gap: the least
               urgent request, then the one with the least KV to copy.

No Ray here: the front calls it on its instances' reports, and the cluster simulator on its own.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvloom.cluster.load import LoadReport, RequestLoad


@dataclass(frozen=True)
class Move:
    request_id: str
    src: int
    dst: int
    reason: str        # "drain" | "place" | "priority" | "defrag" | "imbalance"


@dataclass
class RebalanceSettings:
    imbalance_gap: float = 8.0      # freeness difference (blocks per running request) that triggers a move
    min_running_to_balance: int = 2  # an instance running fewer never sends for balance
    margin_blocks: int = 1          # a destination keeps this many blocks free beyond the request's demand


def plan_moves(loads: Sequence[LoadReport], settings: RebalanceSettings | None = None,
               exclude: Iterable[str] = ()) -> list[Move]:
    """exclude: request ids not to move now (already moving, or moved a moment ago)."""
    s = settings or RebalanceSettings()
    busy = set(exclude)
    live = [l for l in loads if l.alive]
    # What each instance can still give a moved-in request: its free blocks less what its own queue and
    # high-priority headroom will take (updated as moves are planned).
    free = {l.instance_id: l.free_after_queue for l in live}
    moves: list[Move] = []
    sent_from: set[int] = set()

    def destination(src: int, need: int) -> int | None:
        options = [l for l in live if l.instance_id != src and not l.draining
                   and free[l.instance_id] - need >= s.margin_blocks]
        if not options:
            return None
        return max(options, key=lambda l: (l.freeness, free[l.instance_id], -l.instance_id)).instance_id

    def move(r: RequestLoad, src: int, reason: str) -> bool:
        dst = destination(src, r.demand_blocks)
        if dst is None:
            return False
        free[dst] -= r.demand_blocks
        free[src] += r.blocks
        busy.add(r.request_id)
        moves.append(Move(r.request_id, src, dst, reason))
        return True

    for l in live:                                              # drain
        if l.draining:
            for r in sorted(_candidates(l, busy), key=lambda r: (not r.running, r.priority, -r.num_tokens)):
                move(r, l.instance_id, "drain")
            sent_from.add(l.instance_id)

    for l in live:                                              # make room for a queued request
        if l.instance_id in sent_from or l.draining or l.waiting == 0:
            continue
        if l.head_demand_blocks <= l.free_blocks:
            continue
        head = _queued_head(l, busy)
        if head is not None and head.computed_tokens == 0 and move(head, l.instance_id, "place"):
            sent_from.add(l.instance_id)
            continue
        short = l.head_demand_blocks - l.free_blocks
        victims = [r for r in _candidates(l, busy) if r.running and r.priority >= l.head_priority]
        for r in sorted(victims, key=lambda r: (-r.priority, r.blocks)):
            if short <= 0:
                break
            if move(r, l.instance_id, "priority" if r.priority > l.head_priority else "defrag"):
                short -= r.blocks
                sent_from.add(l.instance_id)

    ranked = sorted((l for l in live if not l.draining and l.instance_id not in sent_from),
                    key=lambda l: (l.freeness, l.instance_id))
    if len(ranked) >= 2:                                        # imbalance
        src, dst = ranked[0], ranked[-1]
        if dst.freeness - src.freeness > s.imbalance_gap and src.running >= s.min_running_to_balance \
                and dst.running + 1 < src.running:
            options = [r for r in _candidates(src, busy) if r.running
                       and free[dst.instance_id] - r.demand_blocks >= s.margin_blocks]
            if options:
                r = min(options, key=lambda r: (-r.priority, r.blocks, r.request_id))
                free[dst.instance_id] -= r.demand_blocks
                moves.append(Move(r.request_id, src.instance_id, dst.instance_id, "imbalance"))
    return moves


def _candidates(l: LoadReport, busy: set[str]) -> list[RequestLoad]:
    return [r for r in l.requests if r.request_id not in busy]


def _queued_head(l: LoadReport, busy: set[str]) -> RequestLoad | None:
    """The queued request admission would take next (the most urgent, then the oldest: report order)."""
    queued = [r for r in l.requests if not r.running and r.request_id not in busy]
    return min(queued, key=lambda r: r.priority) if queued else None
