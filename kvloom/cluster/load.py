"""An instance's load as the global scheduler sees it, computed from a scheduler and its block pool (no Ray).

Llumnix's freeness F = (M - sum V) / B: free memory minus the *virtual usage* of the instance's requests,
per running request. Virtual usage here:
  - a queued request counts at the blocks it still needs to be admitted (its full demand, not what it holds);
  - every high-priority request (priority < 0; lower is more urgent, as in vLLM) reserves `headroom_blocks`
    more, so the instance looks fuller and both dispatch and migration keep interference off it;
  - a draining instance counts as full (freeness -inf): nothing is sent to it, everything moves out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

HIGH_PRIORITY_HEADROOM_BLOCKS = 4


@dataclass
class RequestLoad:
    """One request (a whole family of n samples) on an instance, as a migration candidate."""

    request_id: str            # the parent id: the one the client's response carries
    blocks: int                # KV blocks it holds now (a family's shared blocks count once per sample)
    demand_blocks: int         # blocks it needs to hold all of its tokens (a queued one: what admission takes)
    num_tokens: int            # prompt + output so far (the longest sample's)
    priority: int
    running: bool              # False: queued (waiting or preempted)
    computed_tokens: int = 0   # of its first sample: 0 for a queued request that never ran


@dataclass
class LoadReport:
    """free_blocks counts cached-but-unreferenced blocks as free (allocate() can hand them out).
    queued_demand_blocks: blocks the waiting requests still need to be admitted.
    headroom_blocks: reserved for the instance's high-priority requests.
    free_after_queue = free_blocks - queued_demand_blocks - headroom_blocks.
    freeness = free_after_queue / max(1, running), -inf while draining."""

    instance_id: int
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    queued_demand_blocks: int
    free_after_queue: int
    freeness: float
    block_size: int = 16
    alive: bool = True
    num_add_calls: int = 0          # add_request calls this instance has processed (the front's dispatch ledger)
    draining: bool = False
    headroom_blocks: int = 0
    head_demand_blocks: int = 0     # the first queued request's demand (0: nothing queued)
    head_priority: int = 0
    requests: list[RequestLoad] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["freeness"]):    # JSON has no infinity
            d["freeness"] = None
        return d


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens plus the next one's slot."""
    return -(-(num_tokens + 1) // block_size)


def load_report(instance_id: int, scheduler, pool, block_size: int, families: dict[str, list[str]] | None = None,
                alive: bool = True, draining: bool = False, num_add_calls: int = 0,
                headroom_per_request: int = HIGH_PRIORITY_HEADROOM_BLOCKS) -> LoadReport:
    """families: parent id -> its samples' request ids (the engine's _family); without it every scheduler
    request is its own family."""
    demand = 0
    for req in scheduler.waiting:
        demand += max(0, blocks_for(req.num_tokens, block_size) - len(req.block_ids))
    head = scheduler.waiting[0] if scheduler.waiting else None
    head_demand = 0 if head is None else max(0, blocks_for(head.num_tokens, block_size) - len(head.block_ids))
    running = len(scheduler.running)
    urgent = sum(1 for r in scheduler.requests.values() if r.priority < 0)
    headroom = urgent * headroom_per_request
    # In blocks: with sliding-window pages (kv/window_pages.py) a new block costs pages_per_block pages, so
    # free pages count for that many fewer blocks (conservative: blocks behind every window cost one).
    per_block = getattr(scheduler, "pages_per_block", 1)
    free = pool.num_free // per_block
    after = free - demand - headroom
    freeness = -math.inf if draining else after / max(1, running)
    return LoadReport(instance_id, running, len(scheduler.waiting), free, pool.num_blocks // per_block, demand, after,
                      freeness, block_size, alive, num_add_calls, draining, headroom, head_demand,
                      0 if head is None else head.priority,
                      request_loads(scheduler, block_size, families))


def request_loads(scheduler, block_size: int, families: dict[str, list[str]] | None = None) -> list[RequestLoad]:
    groups = families or {rid: [rid] for rid in scheduler.requests}
    out = []
    for parent, members in groups.items():
        reqs = [scheduler.requests[m] for m in members if m in scheduler.requests]
        if not reqs:
            continue       # all its samples wait to fork, or it is finishing
        first = reqs[0]
        longest = max(r.num_tokens for r in reqs)
        out.append(RequestLoad(parent, sum(len(r.block_ids) for r in reqs),
                               sum(blocks_for(r.num_tokens, block_size) for r in reqs), longest, first.priority,
                               any(r.status.value == "running" for r in reqs), first.num_computed_tokens))
    return out
