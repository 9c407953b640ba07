"""The cluster simulator: every request finishes, no KV block leaks, and migration fixes a skewed dispatch.

Step times are modelled (simulated clock), so nothing here depends on how busy the machine is.
"""
import pytest

from kvloom.bench.cluster_sim import POLICIES, ClusterSim, SimConfig, cluster_trace, default_step_cost
from kvloom.bench.workloads import find_trace, read_trace


def _small(policy: str, migration: bool, requests, **kw) -> ClusterSim:
    cfg = SimConfig(num_instances=kw.pop("num_instances", 3), policy=policy, migration=migration,
                    num_blocks=kw.pop("num_blocks", 256), max_num_seqs=8, max_num_batched_tokens=64,
                    max_model_len=1024, **kw)
    sim = ClusterSim(cfg, requests, default_step_cost())
    sim.run()
    return sim


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("migration", [False, True])
def test_every_request_finishes_without_leaks(policy, migration):
    rows = read_trace(find_trace("burstgpt"))
    reqs = cluster_trace(rows, 3, 17, 2.0)             # 51 requests, shortened below to keep it fast
    reqs = [(t, min(n_in, 300), min(n_out, 60)) for t, n_in, n_out in reqs]
    sim = _small(policy, migration, reqs)
    s = sim.summary()
    assert s["finished"] == s["requests"] == 51
    assert all(t.end is not None and t.first_token is not None and t.end >= t.first_token >= t.arrival
               for t in sim.trips)
    for inst in sim.instances:                         # every block back in its pool, nothing left queued
        assert inst.pool.num_free == inst.pool.num_blocks
        assert not inst.sched.requests
    assert not sim.moving
    assert s["leaked_blocks"] == 0
    if not migration:
        assert s["migrations"] == 0


def _skewed() -> list[tuple[float, int, int]]:
    """Round-robin over 2 instances with alternating sizes: instance 0 gets every long request (more KV than
    its pool holds at once, so they queue), instance 1 every tiny one."""
    reqs = []
    for k in range(48):
        big = k % 2 == 0
        reqs.append((0.05 * k, 400 if big else 8, 200 if big else 4))
    return reqs


def test_migration_relieves_a_skewed_dispatch():
    off = _small("round-robin", False, _skewed(), num_instances=2, num_blocks=160)
    on = _small("round-robin", True, _skewed(), num_instances=2, num_blocks=160)
    s_off, s_on = off.summary(), on.summary()
    assert s_off["finished"] == s_on["finished"] == 48
    assert s_on["leaked_blocks"] == s_off["leaked_blocks"] == 0
    # Without migration the big requests never leave instance 0; with it some run on instance 1.
    assert {t.instance for k, t in enumerate(off.trips) if k % 2 == 0} == {0}
    assert s_on["migrations"] > 0
    assert any(t.moves for t in on.trips)
    assert s_on["max_queue"] < s_off["max_queue"] or s_on["ttft_p99_s"] < s_off["ttft_p99_s"]


def test_time_scaling_keeps_the_load_per_instance():
    rows = read_trace(find_trace("azure-conv"))
    a, b = cluster_trace(rows, 4, 10, 1.0), cluster_trace(rows, 8, 10, 1.0)
    assert len(a) == 40 and len(b) == 80
    rate = lambda r: (len(r) - 1) / r[-1][0]   # noqa: E731
    assert rate(b) == pytest.approx(2 * rate(a))
    short = read_trace(find_trace("burstgpt"))
    tiled = cluster_trace(short, 64, 10, 1.0)          # longer than the trace: replayed back to back
    assert len(tiled) == 640 and all(x[0] <= y[0] for x, y in zip(tiled, tiled[1:]))


def test_a_moved_request_keeps_its_kv():
    """Moved by hand mid-decode: it finishes on the destination and no token is computed twice."""
    cfg = SimConfig(num_instances=2, policy="round-robin", migration=False, num_blocks=64,
                    max_num_seqs=4, max_num_batched_tokens=64)
    sim = ClusterSim(cfg, [(0.0, 200, 100)], default_step_cost())
    sim.migrate_at(0.4, "0", 1)            # prompt done at ~0.17 s, 100 decodes of ~8 ms: mid-decode
    s = sim.run()
    (trip,) = sim.trips
    assert trip.moves == 1 and trip.instance == 1 and trip.preemptions == 0
    assert s["migrations_by_reason"] == {"manual": 1} and s["leaked_blocks"] == 0
    # Every position computed exactly once: the prompt, then each output token but the last.
    assert s["computed_tokens"] == 200 + 100 - 1
    assert s["finished"] == 1
