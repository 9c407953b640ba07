"""`kvloom bench latency` (batch 1) and `kvloom bench throughput` (many prompts at once)."""
from __future__ import annotations

import statistics
import time

import torch

from kvloom.corpus import prompts_of_length
from kvloom.engine.engine import Engine
from kvloom.kv.kv_cache import kv_bytes_per_token
from kvloom.quant.block_embedding import BlockEmbedding
from kvloom.quant.w8a8_linear import W8A8Linear
from kvloom.sampling_params import SamplingParams


def _tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _macs(linear) -> int:
    """Multiply-accumulates of one row through a linear layer, float or quantized."""
    return linear.in_features * linear.out_features


def _head_bytes_at_one_row(head) -> int:
    """The LM head's bytes a batch-1 step reads: with the grouped-GEMV copy (pack_row_groups), that copy and
    not the [out, in] one beside it."""
    read = _tensor_bytes(head)
    if isinstance(head, W8A8Linear) and head.packed is not None:
        read -= head.weight.numel() * head.weight.element_size()
    return read


def _embedding_row_bytes(embedding) -> int:
    if isinstance(embedding, BlockEmbedding):
        return embedding.row_bytes
    return embedding.weight[0].numel() * embedding.weight.element_size()


def weight_bytes(engine: Engine) -> tuple[int, int]:
    """(bytes of every weight a batch-1 decode step reads, multiply-accumulates per token in the decoder layers)."""
    model = engine.model
    # A decode step reads all layer weights (quantized ones as stored), the final norm, the
    # LM head, and of the embedding table one row.
    read = (_tensor_bytes(model.layers) + _tensor_bytes(model.norm) + _head_bytes_at_one_row(model.lm_head)
            + _embedding_row_bytes(model.embed_tokens))
    layer_macs = sum(_macs(m) for layer in model.layers
                     for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                               layer.mlp.down_proj))
    return read, layer_macs


def memory_floor(engine: Engine, context_len: int, bandwidth_gbs: float) -> dict:
    """The fastest a batch-1 decode step can be: bytes read (weights + KV of the context) / bandwidth."""
    weights, _ = weight_bytes(engine)
    kv = int(context_len * kv_bytes_per_token(engine.model.shape, engine.dtype, engine.config.kv_cache_dtype,
                                              engine.config.block_size))
    floor_s = (weights + kv) / (bandwidth_gbs * 1e9)
    return {"bytes_per_step": weights + kv, "weight_bytes": weights, "kv_bytes": kv,
            "bandwidth_gbs": bandwidth_gbs, "floor_ms_per_token": floor_s * 1e3,
            "floor_tokens_per_s": 1.0 / floor_s}


def run_latency(engine: Engine, input_len: int, output_len: int, iters: int = 3, warmup: int = 1,
                bandwidth_gbs: float | None = None) -> dict:
    """Batch-1: time to first token (prefill) and the mean time per later token (decode)."""
    # A different prompt each time: a repeated one would be a prefix-cache hit, not a prefill.
    prompts = prompts_of_length(engine.tokenizer, [input_len] * (warmup + iters))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prefill, decode = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params)
        t0 = time.perf_counter()
        t_first = None
        n = 0
        while engine.has_unfinished():
            for out in engine.step():
                n = len(out.token_ids)
                if t_first is None and n:
                    t_first = time.perf_counter()
        t_end = time.perf_counter()
        if i >= warmup:
            prefill.append(t_first - t0)
            decode.append((t_end - t_first) / max(1, n - 1))
    p, d = statistics.median(prefill), statistics.median(decode)
    result = {"input_len": input_len, "output_len": output_len, "iters": iters,
              "prefill_ms": p * 1e3, "decode_ms_per_token": d * 1e3, "decode_tokens_per_s": 1.0 / d,
              "threads": torch.get_num_threads()}
    if bandwidth_gbs:
        floor = memory_floor(engine, input_len + output_len // 2, bandwidth_gbs)
        result["memory_floor"] = floor
        result["fraction_of_memory_floor"] = floor["floor_ms_per_token"] / (d * 1e3)
    return result


def run_throughput(engine: Engine, num_prompts: int, input_len: int, output_len: int,
                   matmul_gflops: float | None = None) -> dict:
    """All prompts at once, offline; output tokens per second over the whole run."""
    prompts = prompts_of_length(engine.tokenizer, [input_len] * num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    produced = steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        produced += sum(len(o.delta_token_ids) for o in outs)
    elapsed = time.perf_counter() - t0
    result = {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
              "elapsed_s": elapsed, "output_tokens": produced, "output_tokens_per_s": produced / elapsed,
              "total_tokens_per_s": (produced + num_prompts * input_len) / elapsed, "steps": steps,
              "preemptions": engine.scheduler.num_preemptions, "threads": torch.get_num_threads()}
    if matmul_gflops:
        # Matmul work: every processed token through the layers, every sampled token through the LM head.
        _, layer_macs = weight_bytes(engine)
        shape = engine.model.shape
        processed = num_prompts * input_len + produced - num_prompts
        flops = 2 * layer_macs * processed + 2 * shape.vocab_size * shape.hidden_size * produced
        result["roofline"] = {"matmul_gflops_measured": matmul_gflops, "gflop": flops / 1e9,
                              "achieved_gflops": flops / elapsed / 1e9,
                              "fraction_of_roofline": flops / elapsed / 1e9 / matmul_gflops}
    return result
