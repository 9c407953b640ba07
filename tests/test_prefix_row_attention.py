"""A prompt token's attention is the same float operations whatever chunk it comes in.

Over a float KV pool the native backend runs each span token as one more decode row over its own prefix
(kvloom/attention/backend.py, NativeAttention.prefix_rows). SDPA over a chunk gives results that depend on
the chunk's shape in the last bits; in the int8-activation modes those bits move a rounding step and then a
token. These tests fail on SDPA spans: w8a8 on the default model changed tokens between chunk sizes.
"""
import pytest

from kvloom import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colours:", "Write a haiku about the sea.", "1, 1, 2, 3, 5, 8,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("quantization", ["w8a8", "gguf"])
def test_int8_activation_modes_give_the_same_tokens_in_any_chunking(quantization):
    whole = LLM(quantization=quantization, max_num_batched_tokens=512)
    alone = [whole.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    for chunk in (8, 13):
        chunked = LLM(quantization=quantization, max_num_batched_tokens=chunk, enable_prefix_caching=False)
        assert [r.token_ids for r in chunked.generate(PROMPTS, GREEDY)] == alone, chunk


def test_logprobs_are_bit_identical_across_chunk_sizes():
    """Row-invariant linears (gguf) plus prefix-row attention: a token's logits do not depend on the chunk."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    runs = []
    for chunk in (7, 512):
        llm = LLM(quantization="gguf", max_num_batched_tokens=chunk, enable_prefix_caching=False)
        runs.append([[(lp.token_id, lp.logprob, tuple(lp.top)) for lp in r.logprobs]
                     for r in llm.generate(PROMPTS[:3], params)])
    assert runs[0] == runs[1]
