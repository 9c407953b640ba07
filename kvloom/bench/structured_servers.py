"""`kvloom bench structured --serve-url URL [--serve-url URL2 ...]`: the same JSON-schema chat requests
through OpenAI-compatible servers side by side (kvloom's and, say, llama-server on the same GGUF).

Each server gets the same requests (PERSON_SCHEMA through `response_format: json_schema`, greedy, streamed)
at each concurrency, servers alternating per round; per server: the share of outputs that parse and validate
against the schema, TTFT, TPOT and output tokens/s. Constrained and unconstrained runs side by side show
what the constraint costs each server.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time

from kvloom.bench.structured import PERSON_SCHEMA

PROMPTS = ["Describe a fictional person as JSON.", "Invent a customer record as JSON.",
           "Give a JSON profile of a made-up scientist.", "A JSON record for an imaginary neighbour, please."]


async def _one(client, model: str, prompt: str, constrained: bool, max_tokens: int) -> dict:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA,
                                                                        "strict": True}}} if constrained else {}
    t0 = time.perf_counter()
    first, text, usage, finish = None, "", None, None
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text += chunk.choices[0].delta.content
    end = time.perf_counter()
    n = usage.completion_tokens if usage is not None else None
    return {"ttft_s": (first or end) - t0, "e2e_s": end - t0, "tokens": n, "text": text, "finish": finish}


def _valid(text: str) -> bool:
    import jsonschema
    try:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def _run(url: str, constrained: bool, num_requests: int, concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"),
                         api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)

    async def bounded(k):
        async with gate:
            return await _one(client, model, PROMPTS[k % len(PROMPTS)], constrained, max_tokens)

    t0 = time.perf_counter()
    rows = await asyncio.gather(*[bounded(k) for k in range(num_requests)])
    wall = time.perf_counter() - t0
    tokens = [r["tokens"] for r in rows if r["tokens"]]
    tpots = [(r["e2e_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in rows if r["tokens"] and r["tokens"] > 1]
    return {"url": url, "model": model, "constrained": constrained, "concurrency": concurrency,
            "requests": num_requests, "valid": sum(_valid(r["text"]) for r in rows) if constrained else None,
            "cut_by_max_tokens": sum(r["finish"] == "length" for r in rows),
            "ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in rows),
            "tpot_ms_median": 1e3 * statistics.median(tpots) if tpots else None,
            "output_tok_s": sum(tokens) / wall if tokens else None, "wall_s": wall}


def compare_servers(urls: list[str], concurrencies=(1, 16), num_requests: int = 16, max_tokens: int = 128,
                    rounds: int = 2) -> dict:
    from kvloom.system_info import stack_description
    runs = []
    for conc in concurrencies:
        for r in range(rounds):
            for constrained in (True, False):
                for url in urls:          # alternating servers, so drift hits both alike
                    row = asyncio.run(_run(url, constrained, num_requests, conc, max_tokens))
                    runs.append({"round": r, **row})
                    print({k: v for k, v in runs[-1].items() if k != "model"}, flush=True)
    return {"client": stack_description(), "schema": PERSON_SCHEMA, "runs": runs}
