"""`kvloom bench latency` (batch 1) and `kvloom bench throughput` (many prompts at once)."""
from __future__ import annotations

import statistics
import time

import torch

from kvloom.bench.prompts import prompts_of_length
from kvloom.engine.engine import Engine
from kvloom.sampling_params import SamplingParams


def run_latency(engine: Engine, input_len: int, output_len: int, iters: int = 3, warmup: int = 1) -> dict:
    """Batch-1: time to first token (prefill) and the mean time per later token (decode)."""
    prompt = prompts_of_length(engine.tokenizer, [input_len])[0]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prefill, decode = [], []
    for i in range(warmup + iters):
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
    return {"input_len": input_len, "output_len": output_len, "iters": iters,
            "prefill_ms": p * 1e3, "decode_ms_per_token": d * 1e3, "decode_tokens_per_s": 1.0 / d,
            "threads": torch.get_num_threads()}


def run_throughput(engine: Engine, num_prompts: int, input_len: int, output_len: int) -> dict:
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
    return {"num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
            "elapsed_s": elapsed, "output_tokens": produced, "output_tokens_per_s": produced / elapsed,
            "total_tokens_per_s": (produced + num_prompts * input_len) / elapsed, "steps": steps,
            "preemptions": engine.scheduler.num_preemptions, "threads": torch.get_num_threads()}


def run_hf_reference(engine: Engine, num_prompts: int, input_len: int, output_len: int) -> dict:
    """transformers' own generate, one prompt at a time, on the same weights: the baseline."""
    from transformers import AutoModelForCausalLM

    src = engine.source
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=torch.float32, **kwargs).eval()
    prompts = prompts_of_length(engine.tokenizer, [input_len] * num_prompts)
    produced = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
            produced += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - t0
    return {"engine": "transformers generate, batch 1", "num_prompts": num_prompts, "elapsed_s": elapsed,
            "output_tokens": produced, "output_tokens_per_s": produced / elapsed}
