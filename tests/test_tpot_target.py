"""The TPOT target: a cost fit learned from the steps, and a scheduler that keeps decoding requests' pace."""

import pytest

from kvloom.cli import build_parser, engine_config
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler import Scheduler
from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvloom.engine.tpot_target import HEADROOM, MIN_CHUNK, TpotTarget
from kvloom.errors import KvloomError
from kvloom.kv.block_pool import BlockPool
from kvloom.sampling_params import SamplingParams


def test_the_fit_recovers_a_step_cost_of_decode_rows_and_prompt_tokens_and_what_it_leaves():
    t = TpotTarget(0.1)
    assert t.prompt_tokens_within(10) is None and t.admits(1000)   # nothing measured: no limit yet
    for i in range(60):
        d, p = (i * 7) % 40, (i * 37) % 300
        t.observe(d, p, 0.004 + 0.0025 * d + 0.001 * p)
    per_step, per_decode, per_prompt = t.cost()
    assert per_step == pytest.approx(0.004, rel=1e-4) and per_decode == pytest.approx(0.0025, rel=1e-4)
    assert per_prompt == pytest.approx(0.001, rel=1e-4)
    assert t.correction == pytest.approx(1.0, abs=1e-3)     # an exact fit leaves ~nothing to correct
    assert t.prompt_tokens_within(20) == pytest.approx((0.1 * HEADROOM - 0.004 - 0.0025 * 20) / 0.001, abs=1)
    seats = int((0.1 * HEADROOM - 0.004 - 0.001 * MIN_CHUNK) / 0.0025)    # running requests that fit
    assert t.admits(seats - 2) and not t.admits(seats + 1)
    assert t.describe()["decode_row_ms"] == pytest.approx(2.5)


def test_one_mix_of_steps_puts_every_second_on_its_tokens():
    t = TpotTarget(0.05)
    for _ in range(5):
        t.observe(0, 100, 0.02)                             # prompt-only steps of one size: nothing tells them apart
    assert t.cost() == (0.0, pytest.approx(0.0002), pytest.approx(0.0002))
    assert t.prompt_tokens_within(0) == int(0.05 * HEADROOM / 0.0002)


def test_the_fit_follows_a_host_that_slows_down():
    t = TpotTarget(0.1)
    for slowdown in (1, 2):                                 # the host then takes twice as long for everything
        for i in range(200):
            d, p = (i * 7) % 40, (i * 53) % 300
            t.observe(d, p, slowdown * (0.002 + 0.002 * d + 0.001 * p))
        if slowdown == 1:
            fast = t.prompt_tokens_within(10)
    assert t.prompt_tokens_within(10) == pytest.approx((0.1 * HEADROOM - 0.004 - 0.004 * 10) / 0.002, abs=2)
    assert fast == pytest.approx((0.1 * HEADROOM - 0.002 - 0.02) / 0.001, abs=2)


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
        for d, p in ((0, 100), (10, 0), (5, 40)):
            plan = SchedulerOutput(decodes=[None] * d, spans=[ScheduledChunk("x", [0] * p, 0, [], True)] if p else [])
            s.tpot.observe(d, p, step_seconds(plan), paced=False)
    for i in range(num_requests):
        s.add(Request(str(i), list(range(1, prompt + 1)), SamplingParams(max_tokens=max_tokens), max_tokens, 0.0, None))
    clock, first, last, plans = 0.0, {}, {}, []
    while s.has_unfinished():
        decoding = [r.request_id for r in s.running if r.num_uncomputed == 1 and r.output_token_ids]
        slack = s.tpot.slack(decoding) if s.tpot else 0.0
        plan = s.schedule()
        # What this step was planned with: the prompt tokens its decodes left room for.
        room = s.tpot.prompt_tokens_within(len(plan.decodes), slack) if s.tpot else None
        seconds = step_seconds(plan)
        clock += seconds
        if s.tpot is not None:
            s.tpot.observe(len(plan.decodes), plan.num_tokens - len(plan.decodes), seconds, paced=bool(plan.decodes),
                           decoded=tuple(c.request_id for c in plan.decodes))
        plans.append((plan, room))
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
    for plan, room in plans:
        if plan.decodes:
            assert plan.num_tokens - len(plan.decodes) <= max(MIN_CHUNK, room)


def test_when_decodes_fill_the_target_new_requests_wait_and_prompts_under_way_finish():
    # 1 ms a token and a 40 ms target: 2 + (R + 1) + 16 <= 36 admits one more while 17 or fewer run.
    tpot, plans = _burst(0.04, num_requests=40, prompt=12, max_tokens=30)
    running = [len(p.decodes) + len(p.spans) for p, _ in plans]
    assert max(running) == 18                              # the queue waited (40 requests came at once)
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


def test_decodes_under_the_target_bank_slack_that_prompt_chunks_spend(monkeypatch):
    # Decode rows are cheap here (a 20-row decode step takes 22 ms of a 60 ms target), prompt tokens dear.
    def step_seconds(plan):
        return 0.002 + 0.002 * (plan.num_tokens - len(plan.decodes)) + 0.001 * len(plan.decodes)
    with_slack, plans = _burst(0.06, num_requests=20, prompt=60, max_tokens=40, step_seconds=step_seconds)
    assert max(with_slack.values()) <= 0.06
    paced_steps = [step_seconds(p) for p, _ in plans if p.decodes]
    assert max(paced_steps) > 0.06 * HEADROOM              # some steps spent banked time
    monkeypatch.setattr(TpotTarget, "slack", lambda self, ids: 0.0)
    every_step, strict = _burst(0.06, num_requests=20, prompt=60, max_tokens=40, step_seconds=step_seconds)
    assert max(step_seconds(p) for p, _ in strict if p.decodes) <= 0.06
    # Spending the slack finished the burst sooner: fewer, fuller steps.
    assert sum(step_seconds(p) for p, _ in plans) < sum(step_seconds(p) for p, _ in strict)


def test_paused_samples_do_not_count_against_the_target_so_the_requests_they_wait_for_get_in():
    # A search pauses its samples while another request runs: they decode in no step, so they fill no target.
    pool = BlockPool(200)
    s = Scheduler(pool, block_size=4, max_num_seqs=64, max_num_batched_tokens=64)
    for i in range(6):
        s.add(Request(f"p{i}", [1, 2, 3], SamplingParams(max_tokens=8), 8, 0.0, None))
    s.update(s.schedule(), {f"p{i}": 7 for i in range(6)})
    s.tpot = TpotTarget(0.01)                   # ~1.4 ms a token: six decodes fill the 9 ms goal
    s.tpot.observe(2, 0, 0.003, paced=False)
    s.tpot.observe(4, 8, 0.017, paced=False)
    assert len(s.running) == 6 and not s.tpot.admits(6)
    for r in s.running:
        r.paused = True
    s.add(Request("next", [4, 5, 6], SamplingParams(max_tokens=8), 8, 0.0, None))
    plan = s.schedule()
    assert [c.request_id for c in plan.spans] == ["next"]


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
    assert engine.tpot.num_observed > 10 and engine.tpot.prompt_tokens_within(1) == 0
    assert not engine.tpot.admits(1)
    assert engine.pool.num_free == engine.num_blocks


def test_serve_defaults_to_a_100_ms_target_and_0_turns_it_off():
    p = build_parser()
    assert engine_config(p.parse_args(["serve"])).tpot_target_ms == 100.0
    assert engine_config(p.parse_args(["serve", "--tpot-target-ms", "0"])).tpot_target_ms is None
    assert engine_config(p.parse_args(["generate", "hi"])).tpot_target_ms is None
