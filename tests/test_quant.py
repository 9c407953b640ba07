"""Quantized weights: round-trip bounds, layer accuracy, greedy agreement, perplexity deltas."""
import pytest
import torch

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.quant.int4_linear import Int4Linear, quantize_groupwise_int4
from kvloom.quant.int8_linear import Int8Linear, quantize_per_channel_int8
from kvloom.quant.smoothing import activation_absmax, smooth
from kvloom.quant.w8a8_linear import W8A8Linear


def test_int8_round_trip_within_half_a_step():
    w = torch.randn(96, 160) * torch.rand(96, 1) * 3
    q, scale = quantize_per_channel_int8(w)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group):
    w = torch.randn(64, 256)
    q, scale, zero = quantize_groupwise_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15
    deq = ((q.float().reshape(64, -1, group) - 8) * scale[..., None] + zero[..., None]).reshape(64, 256)
    step = scale.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("layer,tol", [(Int8Linear, 0.02), (W8A8Linear, 0.03), ("int4", 0.15)])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_quantized_linear_close_to_fp32(layer, tol, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(192, 256) / 16, torch.randn(192), torch.randn(rows, 256)
    ref = x @ w.T + b
    q = Int4Linear.from_float(w, b, 32) if layer == "int4" else layer(w, b)
    rel = (q(x) - ref).norm() / ref.norm()
    assert rel < tol, rel


def test_int8_model_keeps_most_greedy_outputs(tiny_model_dir):
    # A random tiny model has nearly flat logits, so it is far touchier than a trained one.
    # Measured here: the first token agrees on 32/32 prompts, whole 8-token outputs on 21/32.
    model = tiny_model_dir("llama")
    prompts = random_prompts(32, seed=30)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = [r.token_ids for r in LLM(model).generate(prompts, params)]
    q8 = [r.token_ids for r in LLM(model, quantization="int8").generate(prompts, params)]
    first = sum(a[0] == b[0] for a, b in zip(ref, q8)) / len(ref)
    whole = sum(a == b for a, b in zip(ref, q8)) / len(ref)
    assert first >= 0.9 and whole > 0.5, (first, whole)


@pytest.mark.timeout(900)
def test_default_model_perplexity_deltas():
    """The issue's targets, on 2048 tokens (measured on an avx512_vnni host: int8 +0.17%, int4 +0.10%, the
    file's Q4_1 groups mapping into int4 without loss)."""
    from kvloom.eval.perplexity import perplexity

    def ppl(scheme):
        return perplexity(LLM(quantization=scheme, max_model_len=1024).engine, num_tokens=2049,
                          window=512)["perplexity"]
    base = ppl("none")
    assert abs(ppl("w8a8") / base - 1) <= 0.02
    assert abs(ppl("int8") / base - 1) <= 0.01
    assert abs(ppl("int4") / base - 1) <= 0.05


def test_smoothing_leaves_the_float_model_unchanged(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen2"))
    ids = random_prompts(1, [40], seed=31)[0]
    from kvloom.engine.window_logits import window_logits
    before = window_logits(llm.engine, ids)
    smooth(llm.engine.model, activation_absmax(llm.engine.model, lambda: window_logits(llm.engine, ids)))
    after = window_logits(llm.engine, ids)
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
