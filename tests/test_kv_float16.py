"""The float16 KV pool (--kv-cache-dtype float16): capacity, invariance to batching/chunking/preemption/prefix
reuse, the decode stack's bits against the module path's, the torch backend, and quality."""
import pytest
import torch

from conftest import random_prompts, save_tiny_gemma3, save_tiny_model
from kvloom import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _f16(model, **kw):
    return LLM(model, kv_cache_dtype="float16", **kw)


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """A tiny Llama with heads of 64: the vector attention kernels read its pool (heads of 16 take the
    portable loop), so the tests below run both."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama-d64")), "llama", hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(params=["d16", "d64"])
def model(request, tiny_model_dir, wide_heads):
    return tiny_model_dir("llama") if request.param == "d16" else wide_heads


def test_float16_pool_holds_twice_the_tokens_and_stores_float16(tiny_model_dir):
    model = tiny_model_dir("llama")
    auto = LLM(model, kv_cache_memory="16MiB").engine
    half = _f16(model, kv_cache_memory="16MiB").engine
    assert half.kv_capacity_tokens == 2 * auto.kv_capacity_tokens
    assert half.runner.kv.layers[0].k.dtype == torch.float16 and half.runner.kv.layout["dtype"] == "torch.float16"
    assert half.runner.decode_stack is not None and "native" in half.runner.describe_backends()["attention_backends"]


def test_float16_greedy_outputs_do_not_depend_on_batching_chunking_caching_or_preemption(model):
    """Every reader attends over the pool's rounded values (a prompt's own keys too), so what a request reads
    never depends on how its prompt was chunked or what else ran."""
    prompts = random_prompts(12, seed=51)
    batched = [r.token_ids for r in _f16(model).generate(prompts, GREEDY)]
    chunked = _f16(model, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert [r.token_ids for r in chunked.generate(prompts, GREEDY)] == batched
    alone = _f16(model)
    assert [alone.generate([p], GREEDY)[0].token_ids for p in prompts[:4]] == batched[:4]
    assert [alone.generate([p], GREEDY)[0].token_ids for p in prompts[:4]] == batched[:4]   # prefix-cached now
    block_bytes = 16 * alone.engine.model.shape.kv_bytes_per_token(torch.float16)
    small = _f16(model, kv_cache_memory=14 * block_bytes, max_num_seqs=6, max_num_batched_tokens=16)   # 14 blocks
    assert [r.token_ids for r in small.generate(prompts, GREEDY)] == batched
    assert small.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    for engine in (chunked.engine, alone.engine, small.engine):
        assert engine.pool.num_free == engine.num_blocks


@pytest.mark.parametrize("quantization", ["none", "w8a8"])
def test_decode_stack_over_float16_kv_gives_the_module_paths_bits(model, quantization):
    """The stack rounds the keys and values it stores to nearest even, as the module path's tensor store does:
    an engine with the stack and one without give bit-identical logprobs at every step."""
    def run(with_stack):
        llm = _f16(model, quantization=quantization, block_size=4, max_num_batched_tokens=64)
        if not with_stack:
            llm.engine.runner.decode_stack = None
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
        outs = llm.generate(random_prompts(5, seed=73), params)
        return [[(lp.token_id, lp.logprob, tuple(lp.top)) for lp in r.logprobs] for r in outs]
    assert run(True) == run(False)


def test_float16_agrees_with_the_float_cache_and_runs_on_the_torch_backend(model):
    # Random tiny models have near-flat logits, so whole outputs may part; their first tokens should not.
    prompts = random_prompts(16, seed=4)
    ref = [r.token_ids for r in LLM(model).generate(prompts, GREEDY)]
    out = [r.token_ids for r in _f16(model).generate(prompts, GREEDY)]
    assert sum(a[:4] == b[:4] for a, b in zip(ref, out)) >= 14
    torch_backend = _f16(model, native_kernels=False)
    assert torch_backend.engine.runner.describe_backends()["attention_backends"] == ["torch"]
    plain = [r.token_ids for r in torch_backend.generate(prompts, GREEDY)]
    assert sum(a[:4] == b[:4] for a, b in zip(out, plain)) >= 14


def test_auto_picks_float16_where_quantized_weights_meet_the_vector_kernels(tiny_model_dir, wide_heads, tmp_path):
    def kv(model, quantization):
        return LLM(model, quantization=quantization, kv_cache_memory="4MiB").engine.config.kv_cache_dtype
    assert kv(wide_heads, "w8a8") == "float16"
    assert kv(wide_heads, "none") == "float32"                      # the reference mode stays exact
    assert kv(tiny_model_dir("llama"), "w8a8") == "float32"         # heads of 16: the portable loop
    assert kv(save_tiny_gemma3(str(tmp_path / "gemma3")), "w8a8") == "float32"   # sliding windows: the same


@pytest.mark.timeout(600)
def test_default_model_float16_kv_is_the_default_and_keeps_perplexity_within_half_a_percent():
    from kvloom.eval.perplexity import perplexity

    def engine(kv):
        return LLM(kv_cache_dtype=kv, max_model_len=1024).engine
    default = engine("auto")
    assert (default.config.quantization, default.config.kv_cache_dtype) == ("gguf", "float16")
    half = perplexity(default, num_tokens=1025, window=512)["perplexity"]
    assert abs(half / perplexity(engine("float32"), num_tokens=1025, window=512)["perplexity"] - 1) <= 0.005
