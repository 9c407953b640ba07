"""The int8 KV cache: round-trip bounds, capacity, invariance to batching/chunking/preemption/forks, quality."""
import pytest
import torch

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.kv.int8_kv_cache import quantize_rows

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _int8(model, **kw):
    return LLM(model, kv_cache_dtype="int8", **kw)


def test_key_and_value_round_trip_within_half_a_step():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 16, 64) * torch.linspace(0.1, 20, 64)   # [blocks, heads, rows, channels]
    q, scale = quantize_rows(keys, 2)                                  # keys: per channel, over a block's rows
    assert scale.shape == (2, 3, 1, 64)
    assert ((q.float() * scale - keys).abs() <= scale / 2 + 1e-6).all()
    values = torch.randn(40, 3, 64)
    q, scale = quantize_rows(values, -1)                               # values: per token
    assert ((q.float() * scale - values).abs() <= scale / 2 + 1e-6).all()


def test_int8_holds_over_1_8x_the_tokens_at_the_same_budget(tiny_model_dir):
    model = tiny_model_dir("llama")
    auto = LLM(model, kv_cache_memory="16MiB").engine.kv_capacity_tokens
    int8 = _int8(model, kv_cache_memory="16MiB").engine.kv_capacity_tokens
    assert int8 >= 1.8 * auto, (auto, int8)


def test_int8_greedy_outputs_do_not_depend_on_batching_chunking_or_preemption(tiny_model_dir):
    """Keys are sealed per block from exact values, so what a request reads never depends on other traffic."""
    model = tiny_model_dir("llama")
    prompts = random_prompts(12, seed=50)
    batched = [r.token_ids for r in _int8(model).generate(prompts, GREEDY)]
    llm = _int8(model, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == batched
    alone = _int8(model)
    assert [alone.generate([p], GREEDY)[0].token_ids for p in prompts[:4]] == batched[:4]
    small = _int8(model, kv_cache_memory=70_000, max_num_seqs=6, max_num_batched_tokens=16)   # 14 blocks
    assert [r.token_ids for r in small.generate(prompts, GREEDY)] == batched
    assert small.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for engine in (llm.engine, alone.engine, small.engine):
        assert engine.pool.num_free == engine.num_blocks
        assert engine.runner.kv.num_staged == 0              # every float staging slot came back


def test_int8_agrees_with_the_float_cache_on_the_first_tokens(tiny_model_dir):
    # Random tiny models have near-flat logits; measured: first token 16/16, whole 24-token outputs 11/16.
    model = tiny_model_dir("llama")
    prompts = random_prompts(16, seed=3)
    ref = [r.token_ids for r in LLM(model).generate(prompts, GREEDY)]
    out = [r.token_ids for r in _int8(model).generate(prompts, GREEDY)]
    assert sum(a[:4] == b[:4] for a, b in zip(ref, out)) >= 14
    assert sum(a == b for a, b in zip(ref, out)) >= 8


def test_int8_forks_copy_staged_blocks_and_match_separate_seeds(tiny_model_dir):
    model = tiny_model_dir("llama")
    prompt = random_prompts(1, [21], seed=12)[0]       # a partly filled last block: staged, then copied
    forked = _int8(model).generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12,
                                                             ignore_eos=True))[0]
    llm = _int8(model)
    separate = [llm.generate([prompt], SamplingParams(temperature=1.0, seed=7 + k, max_tokens=12,
                                                      ignore_eos=True))[0].token_ids for k in range(3)]
    assert [o.token_ids for o in forked.outputs] == separate


@pytest.mark.timeout(600)
def test_default_model_int8_kv_perplexity_within_one_percent():
    """A regression bound, not the quality target. The target is 0.5% (docs/performance.md, "Int8 KV cache");
    this 1,025-token check gave 0.68% on an AVX2-only host (Zen 3, 2026-12-07), where the target is not met."""
    from kvloom.eval.perplexity import perplexity

    def ppl(kv):
        return perplexity(LLM(kv_cache_dtype=kv, max_model_len=1024).engine, num_tokens=1025,
                          window=512)["perplexity"]
    assert abs(ppl("int8") / ppl("float32") - 1) <= 0.01
