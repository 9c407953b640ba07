"""Where a new request goes: pure policies over the instances' load reports (no Ray here).

Each policy takes a list of LoadReport (kvloom.cluster.load) and returns the instance_id of the chosen
one. Dead and draining instances are never chosen.

    round_robin      in turn
    least_loaded     fewest running + waiting requests (ties: most free blocks)
    power_of_two     two instances at random, the less loaded of them
    llumnix          the freest instance (Llumnix's freeness: free blocks minus queued demand, per running
                     request), except that the instance holding the longest cached prefix of the prompt wins
                     while it is not overloaded (prefix affinity)
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from kvloom.cluster.load import LoadReport


class NoInstanceError(RuntimeError):
    """No live instance to place a request on."""


def _alive(loads: Sequence[LoadReport]) -> list[LoadReport]:
    live = [l for l in loads if l.alive and not l.draining]
    if not live:
        raise NoInstanceError("no live engine instance")
    return live


def _queue_len(l: LoadReport) -> tuple:
    return (l.running + l.waiting, -l.free_after_queue, l.instance_id)


class RoundRobin:
    def __init__(self):
        self._counter = itertools.count()

    def __call__(self, loads: Sequence[LoadReport], **_) -> int:
        live = sorted(_alive(loads), key=lambda l: l.instance_id)
        return live[next(self._counter) % len(live)].instance_id


def least_loaded(loads: Sequence[LoadReport], **_) -> int:
    return min(_alive(loads), key=_queue_len).instance_id


def power_of_two(loads: Sequence[LoadReport], rng: random.Random | None = None, **_) -> int:
    live = _alive(loads)
    if len(live) == 1:
        return live[0].instance_id
    a, b = (rng or random).sample(live, 2)
    return min(a, b, key=_queue_len).instance_id


def freest(loads: Sequence[LoadReport]) -> LoadReport:
    """Llumnix's choice: the highest freeness (ties: fewer queued, lower id)."""
    return max(_alive(loads), key=lambda l: (l.freeness, -l.waiting, -l.instance_id))


def overloaded(l: LoadReport, demand_blocks: int = 0, min_free_after: int = 0) -> bool:
    """Would this instance have to queue the request: its queue already overflows its free blocks, or
    the request's own demand does not fit what the queue leaves free."""
    return l.free_after_queue - demand_blocks < min_free_after


def llumnix(loads: Sequence[LoadReport], prefix_blocks: dict[int, int] | None = None,
            prompt_len: int = 0, **_) -> int:
    """prefix_blocks: instance_id -> leading blocks of the prompt cached there (cached_prefix_blocks)."""
    live = _alive(loads)
    if prefix_blocks:
        best = max(live, key=lambda l: (prefix_blocks.get(l.instance_id, 0), l.freeness, -l.instance_id))
        hit = prefix_blocks.get(best.instance_id, 0)
        if hit > 0:
            demand = max(0, -(-(prompt_len + 1) // best.block_size) - hit)
            if not overloaded(best, demand):
                return best.instance_id
    return freest(live).instance_id


POLICIES = {"round-robin": RoundRobin, "least-loaded": lambda: least_loaded,
            "power-of-two": lambda: power_of_two, "llumnix": lambda: llumnix}


def make_policy(name: str):
    """A policy callable by name (round-robin keeps a counter, so each call makes a fresh one)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"dispatch policy must be one of {sorted(POLICIES)}, got {name!r}") from None
