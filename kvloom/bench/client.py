"""An async streaming client for any OpenAI-compatible server, bounded in requests and time."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from tqdm import tqdm

from kvloom.bench.metrics import RequestRecord
from kvloom.bench.workloads import BenchRequest


async def fetch_model(base_url: str, api_key: str | None = None) -> dict:
    """The first model the server lists (name, and max_model_len where the server tells it)."""
    async with httpx.AsyncClient(timeout=30, headers=_headers(api_key)) as h:
        r = await h.get(base_url.rstrip("/") + "/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _one(h: httpx.AsyncClient, url: str, model: str, req: BenchRequest, rec: RequestRecord,
               sampling: dict | None = None) -> None:
    """sampling: temperature, top_p, ... for the body (greedy when None)."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": req.ignore_eos,
            **(sampling or {})}
    rec.start = time.perf_counter()
    chunks = 0
    try:
        async with h.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                now = time.perf_counter()
                if msg.get("choices") and (msg["choices"][0].get("text") or msg["choices"][0].get("finish_reason")):
                    if rec.first_token is None:
                        rec.first_token = now
                    rec.chunk_times.append(now)
                    chunks += 1
                if msg.get("usage"):
                    rec.output_tokens = msg["usage"].get("completion_tokens", 0)
        rec.end = time.perf_counter()
        rec.output_tokens = rec.output_tokens or chunks
        rec.success = rec.first_token is not None
        if not rec.success:
            rec.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"


async def warm_up(base_url: str, model: str, req: BenchRequest, api_key: str | None = None) -> None:
    """One short request before the timed run, so one-time costs (first kernels, caches) are not measured."""
    url = base_url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=120, headers=_headers(api_key)) as h:
        await _one(h, url, model, BenchRequest(0.0, req.prompt[:16], 4), RequestRecord(16, 4))


async def run_requests(base_url: str, model: str, requests: list[BenchRequest], max_duration: float,
                       api_key: str | None = None, progress: bool = True,
                       sampling: dict | None = None,
                       max_concurrency: int | None = None) -> tuple[list[RequestRecord], float]:
    """Send each request at its arrival time; stop sending (and cancel what runs) after max_duration.
    max_concurrency: at most this many in flight; a request due while the limit is reached waits for a slot."""
    url = base_url.rstrip("/") + "/v1/completions"
    records = [RequestRecord(len(r.prompt), r.max_tokens) for r in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration + 60), limits=limits,
                                 headers=_headers(api_key)) as h:
        t0 = time.perf_counter()
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

        async def launch(req: BenchRequest, rec: RequestRecord):
            delay = req.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots:
                await _one(h, url, model, req, rec, sampling)
            bar.update(1)

        tasks = [asyncio.create_task(launch(r, rec)) for r, rec in zip(requests, records)]
        done, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    bar.close()
    for rec in records:
        if not rec.success and rec.error is None:
            rec.error = "not finished within --max-duration"
    return records, duration
