"""The engine pieces inference-time scaling stands on: cumulative logprobs, one sample of a family aborted or
forked, prompt blocks shared by every sample, nothing leaked."""
from __future__ import annotations

import pytest
from conftest import random_prompts

from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams

_engines: dict = {}


@pytest.fixture
def engine(tiny_model_dir):
    """One engine per test module (building one is the slow part); every test leaves it empty."""
    if "e" not in _engines:
        _engines["e"] = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20,
                                            max_num_batched_tokens=32))
    eng = _engines["e"]
    yield eng
    assert not eng.has_unfinished()
    assert eng.pool.num_free == eng.pool.num_blocks     # no block leaked


def run(engine, outs=None) -> dict:
    outs = {} if outs is None else outs
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def reference(engine, prompt, params) -> dict:
    engine.add_request(prompt, params, request_id="ref")
    return {o.index: o for o in run(engine).values()}


SAMPLED = SamplingParams(n=4, temperature=0.9, seed=11, max_tokens=10, ignore_eos=True, logprobs=0)


def test_cumulative_logprob_is_the_sum_of_the_tokens_logprobs(engine):
    outs = reference(engine, random_prompts(1, [21], seed=1)[0], SAMPLED)
    for o in outs.values():
        assert o.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in o.logprobs))
        assert o.cumulative_logprob < 0
    assert len({round(o.cumulative_logprob, 6) for o in outs.values()}) > 1
    engine.add_request(random_prompts(1, [5], seed=1)[0], SamplingParams(max_tokens=3), request_id="plain")
    assert run(engine)["plain"].cumulative_logprob is None     # not kept unless logprobs are asked for


@pytest.mark.parametrize("prompt_len", [32, 37])
def test_every_sample_shares_every_prompt_block(engine, prompt_len):
    engine.add_request(random_prompts(1, [prompt_len], seed=2)[0], SAMPLED, request_id="s")
    while len(engine.scheduler.running) < 4:
        engine.step()
    bs = engine.config.block_size
    tables = [engine.scheduler.requests[r].block_ids for r in engine._family["s"]]
    full = prompt_len // bs
    for t in tables[1:]:
        assert t[:full] == tables[0][:full]
    assert all(engine.pool.ref_count(b) == 4 for b in tables[0][:full])
    engine.abort_request("s")


def test_aborting_one_sample_leaves_the_others_unchanged(engine):
    prompt = random_prompts(1, [29], seed=3)[0]
    ref = reference(engine, prompt, SAMPLED)
    engine.add_request(prompt, SAMPLED, request_id="a")
    for _ in range(5):
        engine.step()
    free_before = engine.pool.num_free
    out = engine.abort_sample("a#2")
    assert out.finished and out.finish_reason == "abort" and out.index == 2
    assert out.token_ids == ref[2].token_ids[:len(out.token_ids)]
    assert engine.pool.num_free > free_before            # its own (copied-on-write) blocks came back
    assert engine.abort_sample("a#2") is None
    outs = run(engine)
    assert {o.index for o in outs.values()} == {0, 1, 3}
    for o in outs.values():
        assert o.token_ids == ref[o.index].token_ids


def test_aborting_the_first_sample_before_its_prompt_is_done_hands_the_prompt_on(engine):
    """Samples 1..n-1 fork from sample 0 once its prompt is computed; when it is aborted first, sample 1
    computes the prompt and the others fork from it: the same tokens as without the abort."""
    prompt = random_prompts(1, [90], seed=4)[0]
    ref = reference(engine, prompt, SAMPLED)
    engine.add_request(prompt, SAMPLED, request_id="h")
    engine.step()                                       # 32 of 90 prompt tokens
    assert engine.abort_sample("h").finish_reason == "abort"
    outs = run(engine)
    assert sorted(o.index for o in outs.values()) == [1, 2, 3]
    for o in outs.values():
        assert o.token_ids == ref[o.index].token_ids


def test_aborting_every_sample_ends_the_request(engine):
    engine.add_request(random_prompts(1, [40], seed=5)[0], SAMPLED, request_id="all")
    engine.step()
    for k in range(4):
        assert engine.abort_sample("all" if k == 0 else f"all#{k}") is not None
    assert not engine.has_unfinished() and "all" not in engine._family


def test_a_fork_shares_its_source_blocks_and_continues_it(engine):
    """A greedy sample forked part-way continues exactly as its source; the fork copies no block until it
    writes into a shared, partly filled one."""
    prompt = random_prompts(1, [27], seed=6)[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = reference(engine, prompt, greedy)[0]
    engine.add_request(prompt, greedy, request_id="g")
    for _ in range(6):
        engine.step()
    src = engine.scheduler.requests["g"]
    used = engine.pool.num_blocks - engine.pool.num_free
    child_id = engine.fork_sample("g")
    child = engine.scheduler.requests[child_id]
    assert child.block_ids == src.block_ids and child.output_token_ids == src.output_token_ids
    assert engine.pool.num_blocks - engine.pool.num_free == used        # nothing allocated by the fork
    outs = run(engine)
    assert outs["g"].token_ids == ref.token_ids
    assert outs[child_id].token_ids == ref.token_ids and outs[child_id].text == ref.text
    assert outs[child_id].index == 1


def test_a_sampled_fork_takes_its_own_seed_and_moves_nothing_else(engine):
    prompt = random_prompts(1, [27], seed=7)[0]
    one = SamplingParams(temperature=1.0, seed=3, max_tokens=14, ignore_eos=True, logprobs=0)
    ref = reference(engine, prompt, one)[0]
    engine.add_request(prompt, one, request_id="p")
    for _ in range(5):
        engine.step()
    shared = len(engine.scheduler.requests["p"].output_token_ids)
    kids = [engine.fork_sample("p", seed=100 + k) for k in range(3)]
    outs = run(engine)
    assert outs["p"].token_ids == ref.token_ids               # the source draws as before
    for k in kids:
        assert outs[k].token_ids[:shared] == ref.token_ids[:shared]
        assert len(outs[k].token_ids) == len(ref.token_ids)
        assert outs[k].cumulative_logprob == pytest.approx(sum(lp.logprob for lp in outs[k].logprobs))
    assert len({tuple(outs[k].token_ids) for k in kids}) > 1  # own seeds: they diverge


def test_fork_refuses_an_unknown_sample(engine):
    with pytest.raises(InvalidRequestError):
        engine.fork_sample("nope")


def test_a_paused_sample_waits_and_then_continues_as_if_never_paused(engine):
    """Searches hold samples between rounds (Engine.pause_sample): a paused sample is never scheduled while
    the others run, and once unpaused it draws exactly the tokens it would have drawn."""
    prompt = random_prompts(1, [23], seed=8)[0]
    ref = reference(engine, prompt, SAMPLED)
    engine.add_request(prompt, SAMPLED, request_id="q")
    for _ in range(4):
        engine.step()
    held = list(engine.scheduler.requests["q#1"].output_token_ids)
    engine.pause_sample("q#1")
    for _ in range(3):
        assert all(o.request_id != "q#1" for o in engine.step())
    assert engine.scheduler.requests["q#1"].output_token_ids == held
    engine.unpause_sample("q#1")
    outs = run(engine)
    for o in outs.values():
        assert o.token_ids == ref[o.index].token_ids
    with pytest.raises(InvalidRequestError):
        engine.pause_sample("q#1")                          # finished


def test_a_paused_sample_gives_its_seat_and_blocks_way(tiny_model_dir):
    """A paused sample must never hold up the requests it waits for (a search's grading requests): lacking a
    seat, the scheduler preempts it first; unpaused, it recomputes and draws the same tokens."""
    eng = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20, max_num_seqs=2))
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = random_prompts(3, [19, 12, 15], seed=9)
    refs = []
    for i, p in enumerate(prompts):
        eng.add_request(p, greedy, request_id=f"ref{i}")
        refs.append(run(eng)[f"ref{i}"].token_ids)
    eng.add_request(prompts[0], greedy, request_id="held")
    for _ in range(3):
        eng.step()
    eng.pause_sample("held")
    eng.add_request(prompts[1], greedy, request_id="b")
    eng.add_request(prompts[2], greedy, request_id="c")      # no seat left but the paused sample's
    outs = {}
    while "b" not in outs or "c" not in outs:
        for o in eng.step():
            assert o.request_id != "held"
            if o.finished:
                outs[o.request_id] = o
    assert eng.scheduler.requests["held"].num_preemptions == 1
    assert [outs["b"].token_ids, outs["c"].token_ids] == refs[1:]
    eng.unpause_sample("held")
    assert run(eng)["held"].token_ids == refs[0]
    assert eng.pool.num_free == eng.pool.num_blocks
