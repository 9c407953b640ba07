"""`kvloom bench peers`: the same prompts through the engines a user would pick instead, in one run.

transformers `generate` (one prompt at a time, and statically batched), llama.cpp
through llama-cpp-python when it is installed (an optional extra), and any
OpenAI-compatible servers given by URL. Ratios are kvloom / peer.
"""
from __future__ import annotations

import time

import torch

from kvloom.bench.offline import run_latency, run_throughput
from kvloom.corpus import prompts_of_length
from kvloom.engine.engine import Engine


def _hf_model(engine: Engine):
    from transformers import AutoModelForCausalLM
    src = engine.source
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(src.directory, dtype=torch.float32, **kwargs).eval()


def hf_batch1(engine: Engine, num_prompts: int, input_len: int, output_len: int, model=None) -> dict:
    """transformers generate, one prompt at a time (what a user gets from a plain loop)."""
    model = model or _hf_model(engine)
    prompts = prompts_of_length(engine.tokenizer, [input_len] * num_prompts)
    produced, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
            produced += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - t0
    return {"engine": "transformers, batch 1", "num_prompts": num_prompts, "elapsed_s": elapsed,
            "output_tokens": produced, "output_tokens_per_s": produced / elapsed}


def hf_static_batch(engine: Engine, num_prompts: int, input_len: int, output_len: int, model=None) -> dict:
    """transformers generate on all prompts as one (equal-length, so unpadded) static batch."""
    model = model or _hf_model(engine)
    ids = torch.tensor(prompts_of_length(engine.tokenizer, [input_len] * num_prompts))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                             min_new_tokens=output_len, pad_token_id=0)
    elapsed = time.perf_counter() - t0
    produced = (out.shape[1] - ids.shape[1]) * num_prompts
    return {"engine": f"transformers, static batch {num_prompts}", "elapsed_s": elapsed,
            "output_tokens": produced, "output_tokens_per_s": produced / elapsed}


def llama_cpp_batch1(engine: Engine, input_len: int, output_len: int, threads: int) -> dict | None:
    """llama.cpp through llama-cpp-python on the same GGUF; None when it is not installed or no GGUF."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    path = engine.source.gguf_path
    if path is None:
        return None
    llm = Llama(model_path=path, n_ctx=input_len + output_len + 8, n_threads=threads, n_batch=512, verbose=False)
    prompt = prompts_of_length(engine.tokenizer, [input_len])[0]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    produced = 0
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        produced += 1
        if produced == 1:
            t_first = time.perf_counter()
        if produced >= output_len:
            break
    t_end = time.perf_counter()
    return {"engine": "llama.cpp (llama-cpp-python), batch 1", "prefill_ms": (t1 - t0) * 1e3,
            "decode_tokens_per_s": (produced - 1) / (t_end - t_first)}


def run_peers(engine: Engine, args) -> dict:
    n, lin, lout = args.num_prompts, args.input_len, args.output_len
    ours_lat = run_latency(engine, lin, lout, iters=2)
    ours_thr = run_throughput(engine, n, lin, lout)
    model = _hf_model(engine)
    hf1 = hf_batch1(engine, args.hf_batch1_prompts, lin, lout, model)
    hfb = hf_static_batch(engine, n, lin, lout, model)
    del model
    lcpp = llama_cpp_batch1(engine, lin, lout, torch.get_num_threads())
    rows = [
        ("batch-1 decode tok/s", ours_lat["decode_tokens_per_s"], "transformers batch 1",
         hf1["output_tokens_per_s"]),
        (f"offline throughput tok/s ({n} prompts)", ours_thr["output_tokens_per_s"],
         f"transformers static batch {n}", hfb["output_tokens_per_s"]),
    ]
    if lcpp:
        rows.append(("batch-1 decode tok/s", ours_lat["decode_tokens_per_s"], "llama.cpp batch 1",
                     lcpp["decode_tokens_per_s"]))
    if args.serve_url:
        rows.extend(_serving_rows(args, engine))
    return {"kvloom_latency": ours_lat, "kvloom_throughput": ours_thr, "transformers_batch1": hf1,
            "transformers_static": hfb, "llama_cpp": lcpp or "not installed (pip install kvloom[peers])",
            "table": [{"metric": m, "kvloom": a, "peer": p, "peer_value": b, "ratio": a / b} for m, a, p, b in rows]}


def _serving_rows(args, engine: Engine) -> list[tuple]:
    """The same concurrent workload against each URL; the first URL is kvloom, the rest are peers."""
    import asyncio
    from types import SimpleNamespace

    from kvloom.bench.metrics import parse_slo
    from kvloom.bench.serve import bench_one
    from kvloom.bench.workloads import synthetic_workload

    wl = synthetic_workload(engine.tokenizer, "poisson", args.serve_requests, float("inf"), 1.0, args.input_len,
                            args.output_len, 0.0, engine.max_model_len, 0)
    opts = SimpleNamespace(api_key=None, max_duration=args.max_duration, slo=args.slo)
    results = [asyncio.run(bench_one(url, wl, opts))[0]["summary"] for url in args.serve_url]
    base = results[0]
    rows = []
    for url, r in zip(args.serve_url[1:], results[1:]):
        rows.append((f"serving output tok/s ({args.serve_requests} at once)", base["output_throughput"], url,
                     r["output_throughput"]))
        if parse_slo(args.slo):
            rows.append((f"serving goodput req/s ({args.slo})", base["goodput"], url, max(r["goodput"], 1e-9)))
    return rows


def format_peers(result: dict) -> str:
    lines = [f"{'metric':<40}{'kvloom':>10}  {'peer':<30}{'peer value':>11}{'ratio':>8}"]
    for r in result["table"]:
        lines.append(f"{r['metric']:<40}{r['kvloom']:>10.1f}  {r['peer']:<30}{r['peer_value']:>11.1f}"
                     f"{r['ratio']:>7.2f}x")
    return "\n".join(lines)
