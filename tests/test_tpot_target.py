"""The TPOT target: a cost fit learned from the steps, and a scheduler that keeps decoding requests' pace."""

import pytest

from kvloom.cli import build_parser, engine_config
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler import Scheduler
from kvloom.engine.tpot_target import HEADROOM, MIN_CHUNK, TpotTarget
from kvloom.errors import KvloomError
from kvloom.kv.block_pool import BlockPool
from kvloom.sampling_params import SamplingParams


def test_the_fit_recovers_a_linear_step_cost_and_the_tokens_it_leaves():
    t = TpotTarget(0.1)
    assert t.tokens_within() is None                    # nothing measured: no limit yet
    for i in range(40):
        n = 20 + (i * 37) % 400
        t.observe(n, 0.004 + 0.0002 * n)
    per_step, per_token = t.cost()
    assert per_step == pytest.approx(0.004, rel=1e-6) and per_token == pytest.approx(0.0002, rel=1e-6)
    assert t.tokens_within() == int((0.1 * HEADROOM - 0.004) / 0.0002)
    assert t.describe()["tokens_within_target"] == t.tokens_within()


def test_one_step_size_puts_every_second_on_its_tokens():
    t = TpotTarget(0.05)
    for _ in range(5):
        t.observe(100, 0.02)
    assert t.cost() == (0.0, pytest.approx(0.0002))
    assert t.tokens_within() == int(0.05 * HEADROOM / 0.0002)


def test_the_fit_follows_a_host_that_slows_down():
    t = TpotTarget(0.1)
    for i in range(200):
        n = 50 + (i * 53) % 300
        t.observe(n, 0.001 * n)
    fast = t.tokens_within()
    for i in range(200):                               # the host now takes twice as long per token
        n = 50 + (i * 53) % 300
        t.observe(n, 0.002 * n)
    assert t.tokens_within() == pytest.approx(fast / 2, abs=2)


def test_bad_targets_are_refused():
    with pytest.raises(ValueError):
        TpotTarget(0.0)
    with pytest.raises(KvloomError, match="tpot_target_ms"):
        EngineConfig(tpot_target_ms=-5)


def _linear(plan):
    return 0.002 + 0.001 * plan.num_tokens


def _burst(target_s: float | None, num_requests=30, prompt=40, max_tokens=24, step_seconds=_linear):
    """A burst through the scheduler on a simulated host whose step takes step_seconds(plan) (by default
    2 ms + 1 ms a token); returns each request's mean time per output token and the plans."""
    pool = BlockPool(1000)
    s = Scheduler(pool, block_size=4, max_num_seqs=64, max_num_batched_tokens=256)
    s.tpot = TpotTarget(target_s) if target_s else None
    if s.tpot is not None:          # the host's cost, as the engine's first steps would have measured it
        for n in (10, 100):
            s.tpot.observe(n, 0.002 + 0.001 * n)
    for i in range(num_requests):
        s.add(Request(str(i), list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), max_tokens, 0.0, None))
    clock, first, last, plans = 0.0, {}, {}, []
    while s.has_unfinished():
        within = s.tpot.tokens_within() if s.tpot else None   # what this step is planned with
        plan = s.schedule()
        seconds = step_seconds(plan)
        clock += seconds
        if s.tpot is not None:
            s.tpot.observe(plan.num_tokens, seconds, paced=bool(plan.decodes))
        plans.append((plan, within))
        s.update(plan, {c.request_id: 7 for c in plan.chunks if c.sample})
        for c in plan.chunks:
            r = s.requests[c.request_id]
            if c.sample:
                first.setdefault(r.request_id, clock)
                last[r.request_id] = clock
                if len(r.output_token_ids) >= max_tokens:
                    s.finish(r.request_id, RequestStatus.FINISHED_LENGTH)
    assert pool.num_free == 1000                       # nothing leaked
    tpot = {rid: (last[rid] - first[rid]) / (max_tokens - 1) for rid in first}
    assert len(tpot) == num_requests                   # nobody dropped
    return tpot, plans


def test_steps_with_decodes_keep_the_target_that_a_plain_budget_misses():
    plain, _ = _burst(None)
    assert max(plain.values()) > 0.06                   # the workload does break a 60 ms target unpaced
    paced, plans = _burst(0.06)
    assert max(paced.values()) <= 0.06
    for plan, within in plans:
        if plan.decodes and within is not None:
            prompt_tokens = plan.num_tokens - len(plan.decodes)
            assert prompt_tokens <= max(MIN_CHUNK, within - len(plan.decodes))


def test_when_decodes_fill_the_target_new_requests_wait_and_prompts_under_way_finish():
    # 1 ms a token and a 40 ms target leave 34 tokens: one more is admitted while 17 or fewer run.
    tpot, plans = _burst(0.04, num_requests=40, prompt=12, max_tokens=30)
    within = int((0.04 * HEADROOM - 0.002) / 0.001)
    assert all(w == pytest.approx(within, abs=1) for _, w in plans)
    running = [len(p.decodes) + len(p.spans) for p, _ in plans]
    assert max(running) == within - MIN_CHUNK                  # the queue waited (40 requests came at once)
    assert max(tpot.values()) <= 0.04


def test_the_correction_keeps_the_target_when_decode_rows_cost_more_than_prompt_tokens():
    # The host of a real CPU burst: a decode row (logits, attention over its context) costs 2.5x a prompt token.
    def step_seconds(plan):
        return 0.002 + 0.001 * (plan.num_tokens - len(plan.decodes)) + 0.0025 * len(plan.decodes)
    plain, _ = _burst(None, step_seconds=step_seconds)
    assert max(plain.values()) > 0.08
    paced, plans = _burst(0.08, step_seconds=step_seconds)
    assert max(paced.values()) <= 0.08
    # Not by starving the batch: the decodes reach ~what fits beside a 16-token chunk, (72 - 2 - 16) / 2.5 ms.
    assert max(len(p.decodes) for p, _ in plans) >= 19


def test_engine_outputs_are_the_same_paced_or_not_and_the_fit_learns(tiny_model_dir):
    prompts = [[(7 * i + j) % 200 + 3 for j in range(5 + 3 * i)] for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(**kw):
        engine = Engine(EngineConfig(model=tiny_model_dir(), max_num_batched_tokens=32, **kw))
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        return [done[i] for i in ids], engine

    plain, _ = run()
    # A target below any step's time: every step with decodes takes the smallest prompt chunk and admits no one.
    paced, engine = run(tpot_target_ms=0.001)
    assert paced == plain
    assert engine.tpot.num_observed > 10 and engine.tpot.tokens_within() == 0
    assert engine.pool.num_free == engine.num_blocks


def test_serve_defaults_to_a_100_ms_target_and_0_turns_it_off():
    p = build_parser()
    assert engine_config(p.parse_args(["serve"])).tpot_target_ms == 100.0
    assert engine_config(p.parse_args(["serve", "--tpot-target-ms", "0"])).tpot_target_ms is None
    assert engine_config(p.parse_args(["generate", "hi"])).tpot_target_ms is None
