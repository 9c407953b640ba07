"""The weight-only modes' native product (kvloom/kernels/weight_only_linear.cpp): float activations times
int8 or 4-bit weights in panels of 16 columns.

It must compute the product of the widened weights, give a row the same bits alone or in any batch, and
give every ISA class the same bits (one FMA chain an output, in the same order everywhere).
"""
import pytest
import torch

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.quant.int4_linear import Int4Linear, quantize_groupwise_int4
from kvloom.quant.int8_linear import Int8Linear, quantize_per_channel_int8
from kvloom.quant.weight_panels import int4_panels, padded_columns, panels
from test_kernels import _isas, _module, kmod  # noqa: F401  (the fixture)

SHAPES = [(1, 20, 64), (7, 33, 320), (70, 48, 576), (13, 16, 512)]   # (rows, out, in): ragged panels, segments


def _int8_case(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, s = quantize_per_channel_int8(w)
    return q, s, torch.randn(n, generator=g)


def _int4_case(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    q, scale, zero = quantize_groupwise_int4(torch.randn(n, k, generator=g), group)
    offset = zero - 8.0 * scale
    return q, scale, offset


def _int8_run(mod, x, q, s, bias):
    return mod.int8_weight_linear(x, panels(q), padded_columns(s), q.shape[0], padded_columns(bias))


def _int4_run(mod, x, q, scale, offset, group):
    return mod.int4_weight_linear(x, int4_panels(q), panels(scale), panels(offset), group, q.shape[0], None)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_product_of_the_widened_weights(kmod, m, n, k):
    q, s, bias = _int8_case(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = _int8_run(kmod, x, q, s, bias)
    want = (x.double() @ q.double().T) * s.double() + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64])
def test_int4_product_of_the_widened_weights(kmod, m, n, k, group):
    q, scale, offset = _int4_case(n, k, group, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    got = _int4_run(kmod, x, q, scale, offset, group)
    # fma(q, scale, offset) rounds once: float64 holds q * scale + offset exactly, then one rounding to float32
    w = (q.double() * scale.double().repeat_interleave(group, 1) + offset.double().repeat_interleave(group, 1)).float()
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_a_rows_bits_do_not_depend_on_its_batch(kmod):
    q, s, bias = _int8_case(50, 700, seed=1)
    q4, scale, offset = _int4_case(50, 704, 64, seed=2)
    x8 = torch.randn(37, 700, generator=torch.Generator().manual_seed(3))
    x4 = torch.randn(37, 704, generator=torch.Generator().manual_seed(4))
    all8, all4 = _int8_run(kmod, x8, q, s, bias), _int4_run(kmod, x4, q4, scale, offset, 64)
    for lo, hi in [(0, 1), (5, 6), (3, 10), (8, 37), (36, 37)]:
        assert torch.equal(_int8_run(kmod, x8[lo:hi].contiguous(), q, s, bias), all8[lo:hi])
        assert torch.equal(_int4_run(kmod, x4[lo:hi].contiguous(), q4, scale, offset, 64), all4[lo:hi])


def test_every_isa_class_gives_the_same_bits():
    mods = [_module(isa) for isa in dict.fromkeys(["native", *_isas(), "avx2"])]
    q, s, bias = _int8_case(40, 600, seed=5)
    q4, scale, offset = _int4_case(40, 640, 32, seed=6)
    x = torch.randn(11, 600, generator=torch.Generator().manual_seed(7))
    x4 = torch.randn(11, 640, generator=torch.Generator().manual_seed(8))
    # 5 and 7 rows: widened in registers on AVX-512 builds (up to 8), through the buffer at 7 on AVX2 (up to 6)
    for rows in (1, 5, 7, 11):
        xr, x4r = x[:rows].contiguous(), x4[:rows].contiguous()
        ref8, ref4 = _int8_run(mods[0], xr, q, s, bias), _int4_run(mods[0], x4r, q4, scale, offset, 32)
        for mod in mods[1:]:
            assert torch.equal(_int8_run(mod, xr, q, s, bias), ref8), (mod.isa(), rows)
            assert torch.equal(_int4_run(mod, x4r, q4, scale, offset, 32), ref4), (mod.isa(), rows)


def test_no_rows_give_an_empty_result(kmod):
    q, s, bias = _int8_case(20, 64, seed=0)
    q4, scale, offset = _int4_case(20, 64, 32, seed=0)
    assert _int8_run(kmod, torch.randn(0, 64), q, s, bias).shape == (0, 20)
    assert _int4_run(kmod, torch.randn(0, 64), q4, scale, offset, 32).shape == (0, 20)


def test_bad_shapes_are_refused_clearly(kmod):
    q, s, bias = _int8_case(20, 40, seed=0)
    with pytest.raises(RuntimeError, match="columns"):
        _int8_run(kmod, torch.randn(2, 41), q, s, bias)
    with pytest.raises(RuntimeError, match="float32"):
        _int8_run(kmod, torch.randn(2, 40, dtype=torch.float64), q, s, bias)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_native_modules_agree_with_pytorchs_kernels(kind):
    g = torch.Generator().manual_seed(9)
    w, b, x = torch.randn(80, 256, generator=g), torch.randn(80, generator=g), torch.randn(5, 256, generator=g)
    make = (lambda native: Int8Linear(w, b, native)) if kind == "int8" else \
        (lambda native: Int4Linear.from_float(w, b, 32, native))
    native, torch_path = make(True), make(False)
    assert native.native and not torch_path.native
    assert "native weight-only" in native.gemm_path and "torch" in torch_path.gemm_path
    torch.testing.assert_close(native(x), torch_path(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_modes_give_a_prompt_the_same_tokens_alone_batched_and_chunked(tiny_model_dir, scheme):
    prompts = random_prompts(12, seed=41)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(tiny_model_dir("llama"), quantization=scheme)
    batched = [r.token_ids for r in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts[:4]]
    chunked = LLM(tiny_model_dir("llama"), quantization=scheme, max_num_batched_tokens=8)
    assert alone == batched[:4]
    assert [r.token_ids for r in chunked.generate(prompts, params)] == batched
