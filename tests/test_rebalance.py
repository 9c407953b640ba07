"""Llumnix's migration triggers as a pure function of load reports (kvloom/cluster/rebalance.py)."""
from __future__ import annotations

from kvloom.cluster.load import LoadReport, RequestLoad
from kvloom.cluster.rebalance import RebalanceSettings, plan_moves


def req(rid, blocks=4, demand=None, running=True, priority=0, computed=None):
    return RequestLoad(rid, blocks, blocks if demand is None else demand, blocks * 16, priority, running,
                       (blocks * 16 if running else 0) if computed is None else computed)


def inst(i, requests=(), total=100, draining=False, alive=True, head=None):
    """An instance's report built from its requests, the way load_report adds them up."""
    requests = list(requests)
    held = sum(r.blocks for r in requests)
    queued = [r for r in requests if not r.running]
    demand = sum(r.demand_blocks - r.blocks for r in queued)
    running = sum(r.running for r in requests)
    free = total - held
    head = head or (min(queued, key=lambda r: r.priority) if queued else None)
    after = free - demand
    return LoadReport(i, running, len(queued), free, total, demand, after,
                      float("-inf") if draining else after / max(1, running), 16, alive, 0, draining, 0,
                      0 if head is None else head.demand_blocks - head.blocks, 0 if head is None else head.priority,
                      requests)


def test_balanced_instances_stay_put():
    loads = [inst(0, [req("a"), req("b")]), inst(1, [req("c"), req("d")])]
    assert plan_moves(loads) == []


def test_imbalance_moves_the_smallest_least_urgent_request_to_the_freest():
    loads = [inst(0, [req("a", 30), req("b", 20), req("c", 10, priority=-1), req("d", 12)]), inst(1, [req("e", 5)])]
    moves = plan_moves(loads)
    assert [(m.request_id, m.src, m.dst, m.reason) for m in moves] == [("d", 0, 1, "imbalance")]
    # Already moving (or moved a moment ago): the next candidate.
    assert plan_moves(loads, exclude={"d"})[0].request_id == "b"
    # A gap below the threshold does nothing.
    assert plan_moves(loads, RebalanceSettings(imbalance_gap=1e9)) == []


def test_no_move_that_only_swaps_the_imbalance():
    # One running request each side: moving it would just flip which instance is busy.
    loads = [inst(0, [req("a", 60)]), inst(1, [])]
    assert plan_moves(loads) == []


def test_drain_moves_everything_out_and_nothing_in():
    loads = [inst(0, [req("a"), req("b"), req("q", 0, demand=3, running=False)], draining=True),
             inst(1, [req("c")]), inst(2, [req("d"), req("e")])]
    moves = plan_moves(loads)
    assert sorted(m.request_id for m in moves) == ["a", "b", "q"]
    assert all(m.src == 0 and m.dst in (1, 2) and m.reason == "drain" for m in moves)
    # A draining instance is never a destination.
    loads = [inst(0, [req("a", 40), req("b", 40), req("c", 10)]), inst(1, [], draining=True)]
    assert all(m.dst != 1 for m in plan_moves(loads))


def test_a_queued_request_that_does_not_fit_goes_where_it_fits():
    q = req("q", 0, demand=30, running=False)
    loads = [inst(0, [req("a", 40), req("b", 40), q]), inst(1, [req("c", 10)])]
    assert [(m.request_id, m.dst, m.reason) for m in plan_moves(loads)] == [("q", 1, "place")]


def test_an_urgent_queued_request_gets_room_from_less_urgent_running_ones():
    # The other instance cannot take the urgent request whole, but it can take a running request.
    q = req("urgent", 0, demand=30, running=False, priority=-5)
    loads = [inst(0, [req("a", 40), req("b", 15, priority=3), req("c", 20, priority=3), q], total=90),
             inst(1, [req("d", 60), req("e", 15)], total=100)]
    moves = plan_moves(loads)
    assert moves and all(m.src == 0 and m.dst == 1 and m.reason == "priority" for m in moves)
    assert moves[0].request_id == "b"          # least urgent first, then smallest
    # Equal priority: the same move is de-fragmentation.
    q = req("q", 0, demand=30, running=False)
    loads = [inst(0, [req("a", 40), req("b", 15), req("c", 20), q], total=90), inst(1, [req("d", 60), req("e", 15)])]
    assert [m.reason for m in plan_moves(loads)][:1] == ["defrag"]
    # Running requests more urgent than the queued one are never pushed out for it.
    q = req("q", 0, demand=30, running=False, priority=2)
    loads = [inst(0, [req("a", 40, priority=0), req("b", 15, priority=0), q], total=70),
             inst(1, [req("d", 60), req("e", 15)])]
    assert [m for m in plan_moves(loads) if m.reason in ("priority", "defrag")] == []


def test_dead_instances_neither_send_nor_receive():
    loads = [inst(0, [req("a", 30), req("b", 30), req("c", 30)]), inst(1, [], alive=False)]
    assert plan_moves(loads) == []


def test_a_destination_whose_queue_takes_its_free_blocks_is_not_chosen():
    # Instance 1 has 60 free blocks, but a request queued there will take 55 of them.
    loads = [inst(0, [req("a", 40), req("b", 30), req("c", 20)]),
             inst(1, [req("d", 10), req("q", 0, demand=55, running=False)], total=70)]
    assert plan_moves(loads, RebalanceSettings(imbalance_gap=0.0)) == []
    loads[1] = inst(1, [req("d", 10)], total=70)                  # without the queue it takes one
    assert [m.request_id for m in plan_moves(loads, RebalanceSettings(imbalance_gap=0.0))] == ["c"]
