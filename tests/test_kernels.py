"""The native CPU kernels against the PyTorch code they replace, and the engine with them off.

Every kernel test runs once per instruction-set class: the build the engine loads ("native") and an explicit
AVX2-only build (`-mavx2 -mfma -mf16c`, no AVX-512: what AMD EPYC hosts without AVX-512 run), so this machine
checks the AVX2 paths too. KVLOOM_TEST_ISAS (comma-separated: native, baseline, avx2, avx512, avx512_vnni, or
"all" for every class this CPU runs) changes the set; a class above the CPU's is skipped.
"""
import os
import sys

import pytest
import torch

from conftest import hf_greedy, random_prompts
from kvloom import LLM, SamplingParams
import kvloom.kernels as kernels_pkg
from kvloom.kernels import build, kernels
from kvloom.quant.w8a8_linear import W8A8Linear

native = pytest.mark.skipif(kernels() is None, reason="native kernels are turned off (KVLOOM_NO_KERNELS)")


def _isas() -> list[str]:
    want = os.environ.get("KVLOOM_TEST_ISAS", "native,avx2").strip().lower()
    if want == "all":
        return ["native", *build.ISA_CLASSES]
    return [isa.strip() for isa in want.split(",") if isa.strip()]


_modules: dict = {}


def _module(isa: str):
    """The kernels built for one class (cached per process); skips when this CPU does not run the class."""
    if isa not in _modules:
        native = kernels()
        if isa == "native" or (native is not None and native.isa() == isa):   # this CPU's own build's class
            _modules[isa] = native
        else:
            try:
                plan = build.make_plan(isa)
            except build.KernelBuildError as e:   # a class above this CPU's
                _modules[isa] = e
            else:
                _modules[isa] = build.load(plan)
    mod = _modules[isa]
    if isinstance(mod, Exception):
        pytest.skip(str(mod))
    return mod


@pytest.fixture(params=_isas())
def kmod(request):
    """The kernel module of one ISA class."""
    if kernels() is None:
        pytest.skip("native kernels are turned off (KVLOOM_NO_KERNELS)")
    return _module(request.param)


@pytest.fixture
def engine_kernels(kmod, monkeypatch):
    """kmod, made the module every part of the engine calls (each `from kvloom.kernels import kernels`)."""
    original = kernels_pkg.kernels
    for name, mod in list(sys.modules.items()):
        if (name == "kvloom" or name.startswith("kvloom.")) and getattr(mod, "kernels", None) is original:
            monkeypatch.setattr(mod, "kernels", lambda: kmod)
    return kmod


def _pool(num_blocks=40, kvh=2, bs=16, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, kvh, bs, d, generator=g), torch.randn(num_blocks, kvh, bs, d, generator=g)


def _reference(q, k, v, tables, lens, scale):
    """Plain attention over each sequence's blocks, gathered."""
    n, h, d = q.shape
    kvh = k.shape[1]
    out = torch.empty_like(q)
    for i in range(n):
        L = int(lens[i])
        kc = k[tables[i]].permute(1, 0, 2, 3).reshape(kvh, -1, d)[:, :L]
        vc = v[tables[i]].permute(1, 0, 2, 3).reshape(kvh, -1, d)[:, :L]
        kc, vc = kc.repeat_interleave(h // kvh, 0), vc.repeat_interleave(h // kvh, 0)
        p = torch.softmax(q[i][:, None] @ kc.transpose(1, 2) * scale, -1)
        out[i] = (p @ vc)[:, 0]
    return out


@pytest.mark.parametrize("heads,kvh,d", [(6, 2, 64), (2, 2, 128), (8, 1, 128), (6, 2, 32)])  # last: portable loop
def test_float_decode_attention_matches_gathered_attention(kmod, heads, kvh, d):
    k, v = _pool(kvh=kvh, d=d)
    g = torch.Generator().manual_seed(3)
    tables = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(5)])
    lens = torch.tensor([1, 17, 50, 96, 33])
    q = torch.randn(5, heads, d)
    got = kmod.decode_attention_f32(q, k, v, tables, lens, 0.125)
    assert torch.allclose(got, _reference(q, k, v, tables, lens, 0.125), atol=1e-5)


@pytest.mark.parametrize("d", [64, 32])   # the AVX-512 / AVX2 kernel and the portable loop
def test_a_prompts_rows_split_between_threads_by_length_all_match(kmod, d):
    """A prompt's rows as tasks, row i over i + 1 positions: split between threads by their length
    (balanced_split.h), every row computed, each as alone."""
    k, v = _pool(d=d)
    tables = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:6].repeat(90, 1)
    lens = torch.arange(1, 91)
    q = torch.randn(90, 6, d)
    got = kmod.decode_attention_f32(q, k, v, tables, lens, 0.125)
    assert torch.allclose(got, _reference(q, k, v, tables, lens, 0.125), atol=1e-5)
    for i in (0, 44, 89):
        assert torch.equal(kmod.decode_attention_f32(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], 0.125), got[i:i + 1])


@pytest.mark.parametrize("heads,kvh,d", [(6, 2, 64), (3, 3, 64), (8, 2, 64), (14, 2, 128), (8, 1, 128)])
def test_a_chunks_rows_get_their_bits_alone_in_pairs_and_among_drafts(kmod, heads, kvh, d):
    """The AVX2 kernel takes two rows of one sequence, one position apart, as one tile: every row's output is
    the same bits alone, paired, out of order, and next to draft rows (which attend alone under their masks)."""
    k, v = _pool(d=d, kvh=kvh)
    g = torch.Generator().manual_seed(5)
    tables = torch.randperm(40, generator=g)[:8].repeat(23, 1)
    lens = torch.arange(100, 123)                  # a chunk after 99 cached positions
    q = torch.randn(23, heads, d, generator=g)
    masks = torch.full((23,), -1, dtype=torch.long)
    masks[20:] = torch.tensor([~(1 << 1), ~(1 << 2) & ~(1 << 3), ~(1 << 1)])   # three drafts at the end
    alone = torch.cat([kmod.decode_attention_f32(q[i:i + 1], k, v, tables[i:i + 1], lens[i:i + 1], 0.125,
                                                 masks[i:i + 1]) for i in range(23)])
    assert torch.equal(kmod.decode_attention_f32(q, k, v, tables, lens, 0.125, masks), alone)
    assert torch.equal(kmod.decode_attention_f32(q[:20], k, v, tables[:20], lens[:20], 0.125), alone[:20])
    order = torch.randperm(23, generator=g)
    got = kmod.decode_attention_f32(q[order], k, v, tables[order], lens[order], 0.125, masks[order])
    assert torch.equal(got, alone[order])
    assert torch.allclose(alone[:20], _reference(q[:20], k, v, tables[:20], lens[:20], 0.125), atol=1e-5)
    # One position apart but two sequences (other blocks): not a tile.
    two = torch.stack([tables[0], torch.randperm(40, generator=g)[:8]])
    pair = kmod.decode_attention_f32(q[:2], k, v, two, lens[:2], 0.125)
    assert torch.equal(pair[1:], kmod.decode_attention_f32(q[1:2], k, v, two[1:], lens[1:2], 0.125))
    assert torch.allclose(pair, _reference(q[:2], k, v, two, lens[:2], 0.125), atol=1e-5)


@pytest.mark.parametrize("heads,kvh,d", [(6, 2, 64), (14, 2, 128), (6, 2, 32)])   # last: the portable loop
def test_a_float16_pool_reads_as_the_float32_pool_of_its_values(kmod, heads, kvh, d):
    """--kv-cache-dtype float16: rows widened as they are read, then the float32 pool's arithmetic, so the
    output is the float32 pool's bits when that pool holds the float16 values: decodes, a chunk's paired
    rows, draft masks, and a sliding window."""
    k, v = _pool(kvh=kvh, d=d)
    k16, v16 = k.half(), v.half()
    k32, v32 = k16.float(), v16.float()
    g = torch.Generator().manual_seed(6)
    tables = torch.cat([torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(5)]),
                        torch.randperm(40, generator=g)[:8].repeat(6, 1)])
    lens = torch.cat([torch.tensor([1, 17, 50, 96, 33]), torch.arange(100, 106)])   # decodes, then a chunk
    masks = torch.full((11,), -1, dtype=torch.long)
    masks[3] = ~(1 << 2)
    q = torch.randn(11, heads, d, generator=g)
    got = kmod.decode_attention_f32(q, k16, v16, tables, lens, 0.125, masks)
    assert torch.equal(got, kmod.decode_attention_f32(q, k32, v32, tables, lens, 0.125, masks))
    assert torch.allclose(got[:3], _reference(q[:3], k32, v32, tables[:3], lens[:3], 0.125), atol=1e-5)
    assert torch.equal(kmod.decode_attention_f32(q, k16, v16, tables, lens, 0.125, masks, 24),
                       kmod.decode_attention_f32(q, k32, v32, tables, lens, 0.125, masks, 24))
    with pytest.raises(RuntimeError, match="float32 or float16 KV pool"):
        kmod.decode_attention_f32(q, k16, v32, tables, lens, 0.125)


def test_a_block_size_not_a_power_of_two_is_refused(kmod):
    k, v = _pool(bs=12)
    with pytest.raises(RuntimeError, match="block size must be a power of two, got 12"):
        kmod.decode_attention_f32(torch.randn(1, 6, 64), k, v, torch.zeros(1, 2, dtype=torch.long),
                                  torch.tensor([5]), 0.125)


@pytest.mark.parametrize("d", [64, 32])   # the AVX-512 / AVX2 kernel and the portable loop
def test_masked_rows_see_only_their_visible_positions(kmod, d):
    """A draft token's row sees the context and its ancestors: positions whose bit is clear get no weight."""
    k, v = _pool(d=d)
    tables = torch.arange(24).view(4, 6)
    lens = torch.tensor([20, 70, 9, 96])
    masks = torch.tensor([-1, -1 & ~(1 << 1) & ~(1 << 3), ~(1 << 2), ((1 << 63) - 1) & ~(1 << 5)])  # last: bit 63 clear
    q = torch.randn(4, 6, d)
    got = kmod.decode_attention_f32(q, k, v, tables, lens, 0.125, masks)
    for i in range(4):
        L = int(lens[i])
        seen = [p for p in range(L) if p < L - 64 or (int(masks[i]) >> (L - 1 - p)) & 1]
        kept = torch.tensor(seen)
        kc = k[tables[i]].permute(1, 0, 2, 3).reshape(2, -1, d)[:, kept]
        vc = v[tables[i]].permute(1, 0, 2, 3).reshape(2, -1, d)[:, kept]
        kc, vc = kc.repeat_interleave(3, 0), vc.repeat_interleave(3, 0)
        want = (torch.softmax(q[i][:, None] @ kc.transpose(1, 2) * 0.125, -1) @ vc)[:, 0]
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_int8_decode_attention_reads_sealed_and_staged_blocks(kmod):
    from kvloom.kv.int8_kv_cache import quantize_rows
    k, v = _pool(seed=1)
    kq, ks = quantize_rows(k, 2)
    vq, vs = quantize_rows(v, -1)
    tables = torch.randperm(40, generator=torch.Generator().manual_seed(2))[:12].view(3, 4)  # no block shared
    lens = torch.tensor([20, 64, 5])
    slots = torch.full(tables.shape, -1, dtype=torch.long)
    slots[0, 1] = 0                       # this block's keys are still in float staging (slot 0)
    stage = k[tables[0, 1]].clone()[None]
    q = torch.randn(3, 6, 64)
    got = kmod.decode_attention_i8(q, kq, ks.squeeze(2), vq, vs.squeeze(-1), stage, tables, slots, lens, 0.125)
    k_deq = (kq.float() * ks)
    k_deq[tables[0, 1]] = stage[0]
    want = _reference(q, k_deq, vq.float() * vs, tables, lens, 0.125)
    assert torch.allclose(got, want, atol=1e-4)


def _int8_paths(kmod) -> list[str]:
    return ["auto", "native", "int_mm"] + (["avx2"] if kmod.isa() != "baseline" else [])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, 40, 128])
@pytest.mark.parametrize("k", [160, 100, 576])   # 100: not a multiple of 16 (the loops' scalar tail)
def test_int8_products_are_exact_on_every_path(kmod, rows, k):
    """Each loop (the VNNI GEMV, the AVX2 GEMM, the portable loop, oneDNN) gives the exact integer product."""
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (99, k), dtype=torch.int8, generator=g)   # 99: not a multiple of the tiles
    x[0, :8], w[:3, :8] = 127, -127                                       # the extremes (int16 pair sums)
    want = (x.long() @ w.long().t()).int()
    for path in _int8_paths(kmod):
        if path == "int_mm" and (rows <= 16 or k % 8):   # oneDNN's own limits
            continue
        assert torch.equal(kmod.int8_matmul(x, w.t(), path), want), path


def test_int8_products_take_weights_at_minus_128_and_refuse_such_activations(kmod):
    """|-128| is 128 as an unsigned byte, so weights at -128 stay exact in the AVX2 loop's sign trick (a pair is
    at most 2 * 128 * 127 < 2^15); activations come quantized to [-127, 127], and -128 there is refused."""
    x = torch.full((5, 100), 127, dtype=torch.int8)
    x[1:, 1::2] = -127   # row 0: every pair at the extreme, 2 * 128 * 127
    w = torch.full((7, 100), -128, dtype=torch.int8)
    want = (x.long() @ w.long().t()).int()
    for path in _int8_paths(kmod):
        if path != "int_mm":   # oneDNN's own limits: more than 16 rows, k a multiple of 8
            assert torch.equal(kmod.int8_matmul(x, w.t(), path), want), path
    x[2, 3] = -128
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        kmod.int8_matmul(x, w.t(), "auto")


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40, 128])   # the GEMV's rows and the GEMM's
def test_fused_w8a8_linear_equals_the_pytorch_path(kmod, rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(99, 160) / 8, torch.randn(99), torch.randn(rows, 160)   # 99: not a multiple of 16
    lin = W8A8Linear(w, b, native=False)
    want = lin(x)
    got = kmod.w8a8_linear(x, lin.weight.t(), lin.scales, lin.bias)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    h = torch.randn(rows, 99)
    assert torch.equal(kmod.w8a8_linear(x, lin.weight.t(), lin.scales, lin.bias, h.clone()), h + got)


@pytest.mark.parametrize("mode", ["auto", "native", "int_mm"])
def test_w8a8_rows_do_not_depend_on_the_batch(kmod, mode):
    """Batch invariance: a row's output bits are the same alone, in a GEMV-sized batch and in a GEMM-sized one,
    whichever loop computes the product (integer sums are exact; every path shares the float epilogue)."""
    torch.manual_seed(1)
    w, b, x = torch.randn(130, 576) / 8, torch.randn(130), torch.randn(200, 576)
    lin = W8A8Linear(w, b, native=False)
    kmod.set_int8_gemm(mode)
    try:
        alone = torch.cat([kmod.w8a8_linear(x[i:i + 1], lin.weight.t(), lin.scales, lin.bias) for i in range(0, 200, 37)])
        for rows in (4, 16, 17, 64, 200):
            batch = kmod.w8a8_linear(x[:rows], lin.weight.t(), lin.scales, lin.bias)
            picked = list(range(0, rows, 37))
            assert torch.equal(batch[picked], alone[:len(picked)]), rows
    finally:
        kmod.set_int8_gemm("auto")


@native
def test_w8a8_linear_says_which_loop_runs_its_product():
    lin = W8A8Linear(torch.randn(16, 32), None, native=True)
    assert lin.gemm_path == kernels().int8_gemm_path() and lin.gemm_path
    assert "torch._int_mm" in W8A8Linear(torch.randn(16, 32), None, native=False).gemm_path


def test_engine_without_native_kernels_still_matches_transformers(tiny_model_dir):
    model = tiny_model_dir("llama")
    prompts = random_prompts(6, seed=70)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    llm = LLM(model, native_kernels=False, max_num_batched_tokens=16)
    assert [r.token_ids for r in llm.generate(prompts, params)] == hf_greedy(model, prompts, 16)


@pytest.mark.parametrize("arch, quantization", [(a, q) for a in ("llama", "qwen2", "qwen3") for q in ("none", "w8a8")]
                         + [("qwen2", "int8"), ("llama", "int4")])   # weight-only panels; qwen2: with biases
def test_native_decode_stack_is_bit_identical_to_the_module_path(tiny_model_dir, engine_kernels, arch, quantization):
    """Each decode-only step's logits with the layers run by the native stack and by the modules: equal bits.
    The decode rows of a step with prompt chunks take the module path, so batch invariance needs exactly this."""
    llm = LLM(tiny_model_dir(arch), quantization=quantization, max_num_batched_tokens=64)
    runner = llm.engine.runner
    assert runner.decode_stack is not None
    execute, same = runner.logits, []

    def both_paths(plan, all_logits=False):
        if plan.spans or all_logits:
            return execute(plan, all_logits)
        stack, runner.decode_stack = runner.decode_stack, None
        module_logits = execute(plan)   # writes the same K/V to the same slots as the native run after it
        runner.decode_stack = stack
        native_logits = execute(plan)
        same.append(torch.equal(native_logits, module_logits))
        return native_logits

    runner.logits = both_paths
    llm.generate(random_prompts(5, seed=71), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert len(same) > 10 and all(same)


@pytest.mark.parametrize("arch, quantization", [("llama", "none"), ("qwen3", "w8a8")])
def test_decode_stack_over_int8_kv_gives_the_module_paths_bits(tiny_model_dir, engine_kernels, arch, quantization):
    """Over an int8 pool the stack writes keys to the float staging and values quantized per row, as the module
    path does: an engine with the stack and one without give bit-identical logprobs at every step. Blocks of
    4 tokens: many are sealed (keys quantized per channel) and reopened along the way."""
    def run(with_stack):
        llm = LLM(tiny_model_dir(arch), quantization=quantization, kv_cache_dtype="int8", block_size=4,
                  max_num_batched_tokens=64)
        assert llm.engine.runner.decode_stack is not None
        if not with_stack:
            llm.engine.runner.decode_stack = None
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
        outs = llm.generate(random_prompts(5, seed=72), params)
        assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
        return [[(lp.token_id, lp.logprob, tuple(lp.top)) for lp in r.logprobs] for r in outs]
    assert run(True) == run(False)


def test_rms_norm_and_silu_mul_match_pytorch(kmod):
    """The decode stack's small ops against PyTorch's, on 2-D rows and on per-head strided views."""
    torch.manual_seed(5)
    x, w = torch.randn(7, 96), torch.randn(96)
    assert torch.allclose(kmod.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (96,), w, 1e-5), atol=1e-6)
    heads = torch.randn(5, 10, 32)[:, 2:6]            # [5, 4, 32] view with a row stride of 320
    wh = torch.randn(32)
    assert torch.allclose(kmod.rms_norm(heads, wh, 1e-6), torch.nn.functional.rms_norm(heads, (32,), wh, 1e-6),
                          atol=1e-6)
    gate_up = torch.cat((torch.randn(6, 44) * 30, torch.randn(6, 44)), dim=1)   # large |gate|: no overflow; 44: tails
    gate, up = gate_up.split(44, dim=1)
    assert torch.allclose(kmod.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)


def _tie_logits(rows=6, vocab=3000, seed=0):
    """Rows with repeated values (ties), -inf entries, a row of one finite value and one all -inf but three."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 3).round()   # integers: many ties
    x[1, ::3] = float("-inf")
    x[2] = float("-inf")
    x[2, [5, 70, 900]] = torch.tensor([1.0, 1.0, 0.5])
    x[3, 100:] = 2.0
    return x


@pytest.mark.parametrize("vocab", [3000, 1001])   # 1001: a tail past the vector loop
def test_argmax_rows_is_torch_argmax(kmod, vocab):
    """The first index of the maximum, over ties, -inf rows, +inf and NaN (torch.argmax takes the first NaN)."""
    x = _tie_logits(vocab=vocab)
    x[4] = float("-inf")
    x[5, 17] = float("inf")
    assert torch.equal(kmod.argmax_rows(x), x.argmax(-1))
    x[0, vocab - 1] = float("nan")
    x[3, [40, 7]] = float("nan")
    assert torch.equal(kmod.argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("n", [1, 7, 49152 + 3, 3 * 49152 + 5])   # the last: chunks on both threads
def test_all_finite_finds_any_nan_or_inf(kmod, n):
    """The step's non-finite check: False for a NaN, +inf or -inf anywhere (vector body or tail), True otherwise,
    also for values whose sum would overflow."""
    x = torch.randn(n) * 100
    assert kmod.all_finite(x)
    assert kmod.all_finite(torch.full((n,), 3e38))
    for where in {0, n // 2, n - 1}:   # the first chunk, the middle, the tail
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[where] = bad
            assert not kmod.all_finite(y)


_DRAW_SETTINGS = [(0.7, 0, 0.95, 0.0), (1.0, 40, 1.0, 0.0), (0.9, 0, 1.0, 0.05), (1.3, 200, 0.5, 0.0),
                  (0.6, 0, 0.9, 0.02), (1.0, 1, 1.0, 0.0), (1.1, 2999, 0.97, 0.0), (1.0, 0, 1.0, 0.0)]


@pytest.mark.parametrize("row", range(6))
def test_draw_rows_draws_the_samplers_distribution(kmod, row):
    """Inverse-CDF draws at a grid of N uniforms take each token about p N times (within a few: the grid's
    rounding) for the distribution sampler.py's torch path filters (temperature, top-k, min-p, top-p), over
    peaked, flat, tied and masked rows; a masked or filtered token is never drawn, even at u near 0 or 1."""
    from kvloom.engine.sampler import batched_target_probs
    from kvloom.sampling_params import SamplingParams
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3000, generator=g) * torch.tensor([0.3, 1.0, 3.0, 9.0, 3.0, 1.0])[:, None]
    x[4] = x[4].round()                      # ties
    x[5, ::2] = float("-inf")                # masked tokens, as a grammar's
    n = 4000
    u = torch.cat([(torch.arange(n - 2) + 0.5) / (n - 2), torch.tensor([0.0, 1.0 - 2 ** -24])])
    for t, k, p, m in _DRAW_SETTINGS:
        want = batched_target_probs(x[row:row + 1], [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)])[0]
        want = want.double() / want.double().sum()
        got = kmod.draw_rows(x[row].expand(n, -1).contiguous(), torch.full((n,), t), torch.full((n,), k),
                             torch.full((n,), p), torch.full((n,), m), u)
        # Tokens of equal logits are alike (which of them a top-k or top-p keeps at its edge is the order's
        # choice): compare per distinct logit value.
        values, cls = torch.unique(x[row], return_inverse=True)
        drawn = torch.bincount(cls[got[:-2]], minlength=len(values)).double()
        mass = torch.zeros(len(values), dtype=torch.float64).index_add_(0, cls, want)
        assert (mass[cls[got]] > 0).all(), (t, k, p, m)
        # The grid rounds each token's share of the draws by at most one: a class of equal tokens, by its size.
        members = torch.bincount(cls[want > 0], minlength=len(values)).double()
        assert ((drawn - mass * (n - 2)).abs() <= 1 + members).all(), (t, k, p, m)


@pytest.mark.parametrize("n,k", [(49_152 // 16 + 5, 576), (37, 70), (16, 64)])   # ragged groups, K not of 4
def test_grouped_gemv_equals_the_int8_product(kmod, n, k):
    """The grouped loop's int32 sums are the exact product's, for 1-6 rows and for row counts that fill tiles of
    4 and leave 1-3 over; through w8a8_linear (the LM head's call) a row's output has the same bits with or
    without the packed weights, alone or batched (13 rows: the grouped loop's tiles, group by group)."""
    if not kmod.int8_grouped_gemv_available():
        pytest.skip("this build has no grouped GEMV")
    g = torch.Generator().manual_seed(n)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w[0] = -127                                    # extremes: the largest sums, and the sign trick's edge
    packed, sums = kmod.int8_pack_row_groups(w)
    assert torch.equal(sums, w.int().sum(1, dtype=torch.int32))
    for m in (*range(1, 7), 9, 13, 48):
        x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        x[0] = 127
        want = x.int() @ w.int().t()
        assert torch.equal(kmod.int8_grouped_gemv(x, packed, sums, n), want), m
    xf = torch.randn(13, k, generator=g)
    scales, bias = torch.rand(n, generator=g), torch.randn(n, generator=g)
    plain = kmod.w8a8_linear(xf, w.t(), scales, bias)
    batched = kmod.w8a8_linear(xf, w.t(), scales, bias, packed=packed, row_sums=sums)
    assert torch.equal(batched, plain)
    for i in (0, 3, 12):
        alone = kmod.w8a8_linear(xf[i:i + 1].contiguous(), w.t(), scales, bias, packed=packed, row_sums=sums)
        assert torch.equal(alone[0], plain[i]), i
