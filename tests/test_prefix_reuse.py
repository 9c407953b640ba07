"""Prefix caching, forked samples and agent sessions: exact outputs, real reuse, no leaks."""
import pytest
import torch

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.kv.block_pool import BlockPool
from kvloom.kv.prefix_cache import PrefixCache

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _llm(model_dir, **kw):
    return LLM(model_dir, block_size=8, **kw)


def _shared_prefix_prompts(n, prefix_len, seed=0):
    prefix = random_prompts(1, [prefix_len], seed=seed)[0]
    return [prefix + s for s in random_prompts(n, [3 + 5 * i for i in range(n)], seed=seed + 1)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("prefix_len", [32, 37])  # whole blocks, and a partial last block
def test_caching_on_and_off_give_identical_greedy_outputs(model_dir, prefix_len):
    prompts = _shared_prefix_prompts(6, prefix_len)
    off = _llm(model_dir, enable_prefix_caching=False)
    want = [r.token_ids for r in off.generate(prompts, GREEDY)]
    on = _llm(model_dir)
    first = on.generate(prompts[:1], GREEDY)[0]
    assert first.token_ids == want[0] and first.num_cached_tokens == 0
    rest = on.generate(prompts[1:], GREEDY)
    assert [r.token_ids for r in rest] == want[1:]
    assert all(r.num_cached_tokens == prefix_len // 8 * 8 for r in rest)
    again = on.generate(prompts, GREEDY)  # full hits: all but the last token's block comes from the cache
    assert [r.token_ids for r in again] == want
    assert all(r.num_cached_tokens == (len(p) - 1) // 8 * 8 for r, p in zip(again, prompts))
    assert on.engine.pool.num_free == on.engine.num_blocks


def test_request_arriving_while_prefix_is_being_prefilled(model_dir):
    prompts = _shared_prefix_prompts(2, 60, seed=5)
    want = [r.token_ids for r in _llm(model_dir, enable_prefix_caching=False).generate(prompts, GREEDY)]
    llm = _llm(model_dir, max_num_batched_tokens=16)   # A's prompt takes several steps
    e = llm.engine
    e.add_request(prompts[0], GREEDY, request_id="A")
    e.step()
    e.step()                                             # A has 32 tokens in the pool, 4 full blocks cached
    e.add_request(prompts[1], GREEDY, request_id="B")
    done = {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    assert [done["A"].token_ids, done["B"].token_ids] == want
    assert done["B"].num_cached_tokens > 0
    assert e.pool.num_free == e.num_blocks


def test_eviction_under_pressure_recomputes_correctly(model_dir):
    prompts = random_prompts(12, [40] * 12, seed=9)
    want = [r.token_ids for r in _llm(model_dir, enable_prefix_caching=False).generate(prompts, GREEDY)]
    # 16 blocks of 8 tokens: room for a few sequences, far too little to keep every prompt cached.
    probe = _llm(model_dir)
    per_block = probe.engine.model.shape.kv_bytes_per_token(torch.float32) * 8
    llm = _llm(model_dir, kv_cache_memory=16 * per_block, max_num_seqs=2)
    got = [r.token_ids for r in llm.generate(prompts, GREEDY)]
    assert llm.engine.pool.num_evictions > 0
    again = llm.generate(prompts[:1], GREEDY)[0]          # its blocks were evicted long ago
    assert got == want and again.token_ids == want[0] and again.num_cached_tokens == 0
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def _peak_blocks(llm, prompt, params, copies: int):
    e = llm.engine
    for k in range(copies):
        e.add_request(prompt, params, request_id=f"r{k}")
    peak, outs = 0, {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                outs[(out.parent_id, out.index)] = out.token_ids
        peak = max(peak, e.pool.num_used)
    assert e.pool.num_free == e.num_blocks
    return peak, outs


def test_n4_shares_the_prompt_and_matches_separate_seeds(model_dir):
    prompt = random_prompts(1, [64], seed=11)[0]
    n4 = SamplingParams(n=4, temperature=1.0, seed=40, max_tokens=12, ignore_eos=True)
    peak_fork, forked = _peak_blocks(_llm(model_dir), prompt, n4, 1)
    separate = {}
    llm = _llm(model_dir)
    for k in range(4):
        _, outs = _peak_blocks(llm, prompt, SamplingParams(temperature=1.0, seed=40 + k, max_tokens=12,
                                                           ignore_eos=True), 1)
        separate[k] = outs[("r0", 0)]
    assert [forked[("r0", k)] for k in range(4)] == [separate[k] for k in range(4)]
    assert len({tuple(v) for v in separate.values()}) > 1
    # Blocks: 4 separate requests at once hold 4 x (8 prompt + 2 output) blocks; forks share the 8.
    peak_sep, _ = _peak_blocks(_llm(model_dir, enable_prefix_caching=False), prompt,
                               SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True), 4)
    assert peak_fork <= 8 + 4 * 2 + 1 < peak_sep


def test_fork_copy_on_write_keeps_greedy_exact(model_dir):
    prompt = random_prompts(1, [21], seed=12)[0]        # the last prompt block is partly filled: it is copied
    llm = _llm(model_dir)
    single = llm.generate([prompt], GREEDY)[0].token_ids
    many = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    assert [o.token_ids for o in many.outputs] == [single] * 3
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_session_keeps_kv_while_other_traffic_fills_the_pool(model_dir):
    probe = _llm(model_dir)
    per_block = probe.engine.model.shape.kv_bytes_per_token(torch.float32) * 8
    turn1_prompt = random_prompts(1, [50], seed=20)[0]
    traffic = random_prompts(8, [48] * 8, seed=21)       # 8 x 8 blocks: more than the 40-block pool

    def agent(session: bool):
        llm = _llm(model_dir, kv_cache_memory=40 * per_block, max_num_seqs=2)
        sid = "agent-42" if session else None
        t1 = llm.generate([turn1_prompt], GREEDY, session_id=sid)[0]
        llm.generate(traffic, GREEDY)                     # the agent runs a tool meanwhile
        tool_result = random_prompts(1, [12], seed=22)[0]
        turn2_prompt = turn1_prompt + t1.token_ids + tool_result
        t2 = llm.generate([turn2_prompt], GREEDY, session_id=sid)[0]
        return llm, t1, t2, turn2_prompt

    llm, t1, t2, turn2_prompt = agent(session=True)
    computed = len(turn2_prompt) - t2.num_cached_tokens
    # Only the tool result is computed, plus the previous turn's last token (sampled, never fed).
    assert computed == 12 + 1
    _, _, t2_plain, _ = agent(session=False)
    assert t2_plain.num_cached_tokens < t2.num_cached_tokens  # plain LRU lost the agent's KV to the traffic
    want = _llm(model_dir, enable_prefix_caching=False).generate([turn2_prompt], GREEDY)[0].token_ids
    assert t2.token_ids == want == t2_plain.token_ids
    assert llm.close_session("agent-42")
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_block_pool_lru_and_keys():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.set_key(a[0], "k0")
    pool.set_key(a[1], "k1")
    pool.free(a)                       # freed in order: the tail (k1) is evicted first
    assert pool.num_free == 4 and pool.lookup("k0") == a[0]
    fresh = pool.allocate(2)           # the two never-used blocks go first
    assert set(fresh).isdisjoint(a) and pool.num_cached == 2
    pool.share(a[0])                   # a cache hit revives a free block
    assert pool.num_free == 1 and pool.ref_count(a[0]) == 1
    assert pool.allocate(1) == [a[1]] and pool.lookup("k1") is None and pool.num_evictions == 1
    assert pool.allocate(1) is None


def test_prefix_cache_keys_chain_exactly():
    pool = BlockPool(8)
    cache = PrefixCache(pool, block_size=2)
    blocks = pool.allocate(3)
    keys: list[bytes] = []
    cache.register([1, 2, 3, 4, 5, 6, 7], blocks, keys, num_computed=6, salt=b"")
    assert len(keys) == 3
    assert cache.match([1, 2, 3, 4, 5, 6, 7], b"")[0] == blocks       # (7 - 1) // 2 = 3 blocks
    assert cache.match([1, 2, 3, 4, 5, 6], b"")[0] == blocks[:2]      # the last token is always computed
    assert cache.match([9, 2, 3, 4], b"")[0] == []                     # same block contents, other parent
    assert cache.match([1, 2, 3, 4, 5, 6, 7], b"tenant-b")[0] == []     # another salt never hits


def test_two_engines_give_a_prompt_the_same_block_keys(tiny_model_dir):
    """Content keys, not process-local ids: instances can compare which prefixes they hold."""
    prompt = random_prompts(1, [50], seed=21)[0]
    keys = []
    for _ in range(2):
        llm = LLM(tiny_model_dir("llama"))
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))
        keys.append(set(llm.engine.pool.cached_keys()))
        cache = llm.engine.prefix_cache
        assert set(cache.keys(prompt, cache.salt_for(None))) <= keys[-1]
    assert len(keys[0]) == 3 and keys[0] == keys[1]


def test_a_forced_hash_collision_is_detected_not_served(tiny_model_dir, monkeypatch):
    import kvloom.kv.prefix_cache as pc
    monkeypatch.setattr(pc, "block_key", lambda parent, salt, tokens: b"every block collides")
    llm = LLM(tiny_model_dir("llama"))
    first, second = random_prompts(2, [40, 40], seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    llm.generate([first], params)
    out = llm.generate([second], params)[0]
    assert out.num_cached_tokens == 0 and llm.engine.pool.num_collisions > 0
    monkeypatch.undo()
    assert out.token_ids == LLM(tiny_model_dir("llama"), enable_prefix_caching=False).generate([second], params)[0].token_ids


def test_cache_salt_keeps_tenants_apart(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"))
    engine = llm.engine
    prompt = random_prompts(1, [40], seed=23)[0]
    done = {}
    for rid, salt in (("t1", "tenant-1"), ("t2", "tenant-2"), ("t1-again", "tenant-1")):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=2), request_id=rid, cache_salt=salt)
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    done[rid] = o.num_cached_tokens
    assert done == {"t1": 0, "t2": 0, "t1-again": 32}
