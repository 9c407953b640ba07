"""`kvloom bench serve` and `kvloom bench sweep`: load an OpenAI-compatible server, report as vLLM users expect."""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict

import httpx

from kvloom.bench.client import fetch_model, run_requests, warm_up
from kvloom.system_info import stack_description
from kvloom.bench.metrics import parse_slo, summarize
from kvloom.bench.plots import latency_throughput_curve, request_timeline
from kvloom.bench.workloads import TRACE_FILES, Workload, find_trace, synthetic_workload, trace_workload
from kvloom.models.model_source import resolve_model
from kvloom.tokenizer import Tokenizer


def load_tokenizer(model: str | None) -> Tokenizer:
    """The client needs the server's tokenizer to build prompts of exact token counts."""
    return Tokenizer.load(resolve_model(model))


def build_workload(args, tokenizer: Tokenizer, max_len: int, rate: float | None = None) -> Workload:
    kind = args.workload
    if args.trace or kind in TRACE_FILES:
        path = find_trace(args.trace or kind)
        name = os.path.basename(path) if args.trace else kind
        return trace_workload(tokenizer, path, args.num_requests, args.time_scale, max_len, name)
    return synthetic_workload(tokenizer, kind, args.num_requests, rate if rate is not None else args.request_rate,
                              args.burstiness, args.input_len, args.output_len, args.range_ratio, max_len,
                              args.seed, args.prefix_len)


async def _server_info(base_url: str, api_key: str | None) -> dict | None:
    """kvloom servers describe their whole stack; other servers may not."""
    try:
        async with httpx.AsyncClient(timeout=10) as h:
            r = await h.get(base_url.rstrip("/") + "/server_info",
                            headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
            return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def bench_one(base_url: str, workload: Workload, args, progress: bool = True) -> dict:
    model = await fetch_model(base_url, args.api_key)
    await warm_up(base_url, model["id"], workload.requests[0], args.api_key)
    records, duration = await run_requests(base_url, model["id"], workload.requests, args.max_duration,
                                           args.api_key, progress, sampling_body(args),
                                           getattr(args, "max_concurrency", None))
    result = {
        "base_url": base_url,
        "model": model["id"],
        "workload": {"name": workload.name, "description": workload.description,
                     "num_requests": len(workload.requests), "clipped_to_context": workload.clipped},
        "summary": summarize(records, duration, parse_slo(args.slo)),
        "server": await _server_info(base_url, args.api_key),
        "client": stack_description(),
    }
    return result, records


def sampling_body(args) -> dict | None:
    """--temperature / --top-p as request fields; None: greedy (temperature 0)."""
    temperature = getattr(args, "temperature", 0.0)
    if not temperature:
        return None
    return {"temperature": temperature, "top_p": getattr(args, "top_p", 1.0)}


def _max_len(args, model_info: dict) -> int:
    return int(model_info.get("max_model_len") or args.max_model_len or 2048)


def format_table(result: dict) -> str:
    s = result["summary"]
    lines = [f"{'workload':<28}{result['workload']['description']}",
             f"{'server':<28}{result['base_url']}  model {result['model']}",
             f"{'completed / failed':<28}{s['completed']} / {s['failed']}",
             f"{'duration (s)':<28}{s['duration_s']:.2f}",
             f"{'request throughput (req/s)':<28}{s['request_throughput']:.3f}",
             f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}",
             f"{'total throughput (tok/s)':<28}{s['total_token_throughput']:.1f}"]
    if result["workload"]["clipped_to_context"]:
        lines.append(f"{'rows clipped to context':<28}{result['workload']['clipped_to_context']}")
    lines.append(f"{'':<28}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for key, name in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                      ("e2e_ms", "E2E latency (ms)")):
        d = s[key]
        cells = "".join(f"{d[k]:>10.1f}" if d[k] is not None else f"{'-':>10}" for k in ("mean", "median", "p90", "p99"))
        lines.append(f"{name:<28}{cells}")
    if "goodput" in s:
        lines.append(f"{'goodput (req/s)':<28}{s['goodput']:.3f}  ({100 * s['slo_attainment']:.1f}% within "
                     f"{', '.join(f'{k}<={v:g}ms' for k, v in s['slo'].items())})")
    return "\n".join(lines)


def cmd_bench_serve(args) -> dict:
    tokenizer = load_tokenizer(args.tokenizer)
    model_info = asyncio.run(fetch_model(args.base_url[0], args.api_key))
    workload = build_workload(args, tokenizer, _max_len(args, model_info))
    result, records = asyncio.run(bench_one(args.base_url[0], workload, args))
    result["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    print(format_table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**result, "requests": [asdict(r) for r in records] if args.save_requests else None}, f,
                      indent=2, default=str)
        request_timeline(records, os.path.splitext(args.out)[0] + "_timeline.png",
                         f"{workload.name} against {args.base_url[0]}")
    return result


def cmd_bench_sweep(args) -> dict:
    """One curve per server: the same workload at each rate."""
    tokenizer = load_tokenizer(args.tokenizer)
    os.makedirs(args.out, exist_ok=True)
    curves: dict[str, list[dict]] = {}
    everything = []
    for url in args.base_url:
        model_info = asyncio.run(fetch_model(url, args.api_key))
        for rate in args.rates:
            workload = build_workload(args, tokenizer, _max_len(args, model_info), rate=rate)
            result, _ = asyncio.run(bench_one(url, workload, args))
            result["rate"] = rate
            print(f"\n== {url} at {rate} req/s ==\n{format_table(result)}")
            curves.setdefault(f"{result['model']} @ {url}", []).append(result["summary"])
            everything.append(result)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "func"}, "runs": everything}, f,
                  indent=2, default=str)
    latency_throughput_curve(curves, os.path.join(args.out, "curve.png"), f"{args.workload}: latency vs throughput")
    return {"runs": everything}
