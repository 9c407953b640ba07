"""Greedy outputs equal transformers' token for token, however the engine batches, chunks or preempts."""
import pytest

from conftest import hf_greedy, random_prompts
from kvloom import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _run(model_dir, prompts, **engine_args):
    llm = LLM(model_dir, **engine_args)
    results = llm.generate(prompts, GREEDY)
    assert llm.engine.pool.num_free == llm.engine.num_blocks, "KV blocks leaked"
    return llm, [r.token_ids for r in results]


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_greedy_matches_transformers(tiny_model_dir, arch):
    model_dir = tiny_model_dir(arch)
    prompts = random_prompts(6, [5, 17, 33, 1, 48, 9])
    want = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    _, got = _run(model_dir, prompts)
    assert got == want
    assert len({tuple(w) for w in want}) > 1, "degenerate reference: every prompt gave the same output"


def test_chunked_prefill_matches(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = random_prompts(5, [40, 7, 55, 23, 3], seed=1)
    want = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    # A budget of 8 tokens splits every long prompt into chunks fused with running decodes.
    _, got = _run(model_dir, prompts, max_num_batched_tokens=8)
    assert got == want


def test_preemption_matches(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompts = random_prompts(6, [30, 25, 40, 12, 35, 20], seed=2)
    want = hf_greedy(model_dir, prompts, GREEDY.max_tokens)
    # 14 blocks of 8 tokens: too few for six ~50-token sequences at once, enough for any one alone.
    from kvloom.models.llama import LlamaShape
    import transformers
    shape = LlamaShape.from_hf(transformers.AutoConfig.from_pretrained(model_dir), qkv_bias=True)
    memory = 14 * 8 * shape.kv_bytes_per_token(__import__("torch").float32)
    llm, got = _run(model_dir, prompts, block_size=8, kv_cache_memory=memory, max_num_batched_tokens=32)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == want
