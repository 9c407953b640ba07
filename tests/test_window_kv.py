"""Sliding-window KV release (kv/window_pages.py): blocks behind a request's window give their sliding layers'
pages back, and nothing a request produces changes.

The tiny random Gemma 3 has three sliding layers (window 16) and one global one; with blocks of 8 tokens, a
block costs 4 pages while a window covers it and 1 after. Every test compares against the same engine with
release turned off, which test_gemma3.py holds token-exact to transformers.
"""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, random_prompts, save_tiny_gemma3
from kvloom import SamplingParams
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.errors import PromptTooLongError
from kvloom.kv.block_pool import BlockPool
from kvloom.kv.window_pages import WindowPages

BS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=40, ignore_eos=True, n=3)
LONG = random_prompts(3, [150, 90, 60], seed=5)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return save_tiny_gemma3(str(tmp_path_factory.mktemp("window-kv")))


def make(model: str, release: bool = True, **settings) -> Engine:
    engine = Engine(EngineConfig(model=model, quantization="none", block_size=BS, window_kv_release=release,
                                 **settings))
    assert (engine.window_pages is not None) == release
    return engine


def run(engine: Engine, prompts, params, watch=None, cached=None, **add) -> list[list[list[int]]]:
    """Per prompt, its samples' tokens in index order; watch(engine) after each step; cached: a list that gets
    each finished sample's prompt tokens found cached."""
    ids = [engine.add_request(p, params, **add) for p in prompts]
    done: dict[str, dict[int, list[int]]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done.setdefault(out.parent_id, {})[out.index] = out.token_ids
                if cached is not None:
                    cached.append(out.num_cached_tokens)
        if watch is not None:
            watch(engine)
    if not engine.sessions:
        assert engine.pool.num_free == engine.pool.num_blocks, "a KV page leaked"
    return [[done[i][k] for k in sorted(done[i])] for i in ids]


def test_pages_behind_the_window_are_released_and_tokens_do_not_change(gemma):
    budget = 16
    engine = make(gemma, max_num_batched_tokens=budget)
    groups = engine.layer_groups.num_sliding_groups
    # One request holds its window (16 tokens), the margin block, a chunk and the block it opens.
    bound = len(LONG) * groups * (-(-(16 + budget) // BS) + 3)
    peak = []
    released = []

    def watch(e):
        peak.append(e.window_pages.num_pages_held)
        released.extend(r.window_first for r in e.scheduler.running)

    got = run(engine, LONG, GREEDY, watch)
    assert max(peak) <= bound
    assert max(released) > 0, "no request ever let go of a block"
    assert engine.window_pages.num_pages_held == 0
    assert got == run(make(gemma, release=False, max_num_batched_tokens=budget), LONG, GREEDY)
    assert [g[0] for g in got] == hf_greedy(gemma, LONG, GREEDY.max_tokens)


def test_a_context_the_pool_cannot_hold_without_release(gemma):
    # Room for 12 blocks of all four layers: 96 tokens when every layer keeps its KV.
    from kvloom.models.registry import shape_for
    from transformers import AutoConfig

    _, shape = shape_for(AutoConfig.from_pretrained(gemma))
    memory = 12 * BS * shape.kv_bytes_per_token(torch.float32)
    kept = make(gemma, release=False, kv_cache_memory=memory)
    assert kept.max_model_len == 96
    with pytest.raises(PromptTooLongError):
        kept.add_request(LONG[0], GREEDY)
    released = make(gemma, kv_cache_memory=memory, max_num_batched_tokens=16)
    assert released.max_model_len >= len(LONG[0]) + GREEDY.max_tokens
    assert run(released, LONG[:1], GREEDY)[0] == hf_greedy(gemma, LONG[:1], GREEDY.max_tokens)


def test_sampled_families_preemption_and_chunks_match_release_off(gemma):
    from kvloom.models.registry import shape_for
    from transformers import AutoConfig

    _, shape = shape_for(AutoConfig.from_pretrained(gemma))
    prompts = random_prompts(4, [70, 20, 45, 100], seed=9)
    settings = {"kv_cache_memory": 40 * BS * shape.kv_bytes_per_token(torch.float32), "max_num_batched_tokens": 24}
    on = make(gemma, **settings)
    want = run(make(gemma, release=False, **settings), prompts, SEEDED)
    assert run(on, prompts, SEEDED) == want
    assert on.scheduler.num_preemptions > 0, "the pool was meant to force preemption"


def test_prefix_hits_take_up_released_pages_or_fall_back(gemma):
    prompt = LONG[1]
    engine = make(gemma)
    first = run(engine, [prompt], GREEDY)[0][0]
    # The first request's last window is still keyed: a continuation starts from it.
    longer = prompt + first[:10]
    second = run(engine, [longer], GREEDY)
    req_cached = engine.prefix_cache.hits
    assert req_cached >= len(prompt) // BS * BS - BS
    assert [second[0][0]] == hf_greedy(gemma, [longer], GREEDY.max_tokens)
    # Pages reused by other requests: the hit stops where sliding pages remain, and the tokens still match.
    small = make(gemma, kv_cache_memory=engine.config.kv_cache_memory // 4096)   # 64 pages
    run(small, [prompt], GREEDY)
    run(small, random_prompts(2, [120, 120], seed=11), GREEDY)
    cached: list[int] = []
    assert run(small, [longer], GREEDY, cached=cached) == second
    assert cached[0] < req_cached, "the other requests were meant to take the cached pages"


def test_a_request_moved_with_its_kv_continues_the_same(gemma):
    src, dst = make(gemma), make(gemma)
    alone = run(make(gemma), LONG[:1], GREEDY)
    rid = src.add_request(LONG[0], GREEDY)
    while len(src.scheduler.requests[rid].output_token_ids) < 12:
        src.step()
    assert src.scheduler.requests[rid].window_first > 0, "the move should carry a released window"
    dst.import_request(src.export_request(rid, with_kv=True))
    tokens = None
    while dst.has_unfinished():
        for out in dst.step():
            if out.finished:
                tokens = out.token_ids
    assert [[tokens]] == alone
    for e in (src, dst):
        assert e.pool.num_free == e.pool.num_blocks


def test_sessions_continue_from_their_window(gemma):
    def two_calls(engine):
        cached: list[int] = []
        first = run(engine, [LONG[2]], GREEDY, session_id="agent")[0][0]
        second = run(engine, [LONG[2] + first + [5, 6, 7]], GREEDY, cached=cached, session_id="agent")[0][0]
        engine.close_session("agent")
        assert engine.pool.num_free == engine.pool.num_blocks
        return first, second, cached

    on, off = two_calls(make(gemma)), two_calls(make(gemma, release=False))
    assert on[:2] == off[:2]
    assert on[2][0] >= len(LONG[2]) + GREEDY.max_tokens - BS, "the second call did not start from the session"


def test_window_pages_mechanics():
    """Holds, drops, keyed reuse, and a block losing its pages when the pool hands one of them out."""
    pool = BlockPool(20)
    pages = WindowPages(pool, block_size=4, window=8, num_groups=2)
    (a, b) = pool.allocate(2)
    pages.hold(a, fresh=True)
    pages.hold(b, fresh=True)
    assert pool.num_free == 20 - 2 - 4
    pages.hold(a, fresh=False)           # a fork takes it up too
    pages.drop(a)
    assert pages.held(a)
    pages.drop(a)                        # nobody holds it: its pages are free, still keyed
    assert not pages.held(a) and pages.has(a) and pool.num_free == 20 - 2 - 2
    assert pages.usable([a, b], 8) == 8
    pages.hold(a, fresh=False)           # taken up again (a prefix hit)
    pages.drop(a)
    while pages.has(a):                  # the pool reuses free pages: a loses all of its own
        pool.allocate(1)
    assert pages.usable([a, b], 8) == 0
    with pytest.raises(RuntimeError):
        pages.hold(a, fresh=False)
    assert pages.first_needed(8) == 0 and pages.first_needed(13) == 1 and pages.first_kept(13) == 0
