"""One soak request, sent and judged: finished, rejected (with a reason), cancelled by its client, or lost.

Lost is everything a client could not make sense of: a 5xx, a connection error, no answer within the
timeout, a malformed body, an error event inside a 200 stream, a stream that ends without [DONE] when the
client did not hang up, a choice without a finish reason, logprobs missing or of the wrong width.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass

import httpx

from kvloom.bench.soak_mix import FINISH_REASONS, SoakRequest

OUTCOMES = ("finished", "rejected", "cancelled", "lost")


@dataclass
class RequestResult:
    kind: str
    n: int
    outcome: str = "lost"
    reason: str = ""
    status: int | None = None
    ttft: float | None = None     # streams: seconds to the first chunk with generated text or a finish reason
    e2e: float | None = None
    retry_after: float | None = None   # a 503's / 429's Retry-After, seconds

    def set(self, outcome: str, reason: str = "") -> None:
        self.outcome, self.reason = outcome, reason


class _Lost(Exception):
    """The answer is not one a client can accept; the message says why."""


async def perform(h: httpx.AsyncClient, base: str, req: SoakRequest, timeout: float) -> RequestResult:
    res = RequestResult(req.kind, req.n)
    t0 = time.perf_counter()
    try:
        if req.abort_after is not None and req.abort_after < timeout:
            try:
                await asyncio.wait_for(_exchange(h, base, req, res, t0), req.abort_after)
            except asyncio.TimeoutError:
                res.set("cancelled", "abort")      # the client gave up: httpx closes the connection
        else:
            try:
                await asyncio.wait_for(_exchange(h, base, req, res, t0), timeout)
            except asyncio.TimeoutError:
                res.set("lost", f"no complete answer within {timeout:g} s")
    except _Lost as e:
        res.set("lost", str(e))
    except httpx.HTTPError as e:
        res.set("lost", f"{type(e).__name__}: {e}"[:300])
    except Exception as e:     # an answer of a shape the judge did not foresee: lost, and the soak goes on
        res.set("lost", f"unreadable answer ({type(e).__name__}: {e})"[:300])
    res.e2e = time.perf_counter() - t0
    return res


async def _exchange(h: httpx.AsyncClient, base: str, req: SoakRequest, res: RequestResult, t0: float) -> None:
    url = base + ("/v1/chat/completions" if req.endpoint == "chat" else "/v1/completions")
    if not req.stream:
        r = await h.post(url, json=req.body)
        res.status = r.status_code
        if r.status_code != 200:
            _judge_error(req, r, res)
        else:
            _judge_json(req, _json(r.content), res)
        return
    async with h.stream("POST", url, json=req.body) as r:
        res.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            _judge_error(req, r, res)
            return
        if req.behaviour == "invalid":
            raise _Lost("an invalid request was accepted (200)")
        if req.disconnect_after == 0:
            res.set("cancelled", "disconnect")   # hang up as soon as the 200 arrives
            return
        await _judge_stream(req, r, res, t0)


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError as e:
        raise _Lost(f"malformed JSON: {raw[:120]!r}") from e


def _judge_error(req: SoakRequest, r: httpx.Response, res: RequestResult) -> None:
    try:
        err = json.loads(r.content)["error"]
        kind, message = err["type"], err["message"]
        assert isinstance(kind, str) and isinstance(message, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise _Lost(f"HTTP {r.status_code} without an OpenAI error body: {r.content[:120]!r}") from None
    if r.status_code == 503 and kind == "overloaded_error":
        try:
            res.retry_after = float(r.headers.get("retry-after", ""))
        except ValueError:
            raise _Lost(f"503 overloaded without a Retry-After in seconds: {r.headers.get('retry-after')!r}") from None
        res.set("rejected", "503 overloaded")
    elif r.status_code == 429:     # a per-key stream limit: backpressure like a 503, for any request
        retry = r.headers.get("retry-after", "")
        res.retry_after = float(retry) if retry.replace(".", "", 1).isdigit() else 1.0
        res.set("rejected", f"429 {err.get('code') or kind}")
    elif req.behaviour == "invalid" and r.status_code in req.expect_status:
        res.set("rejected", f"{r.status_code} {err.get('code') or err.get('param') or kind}")
    else:
        raise _Lost(f"HTTP {r.status_code} {kind} {err.get('code')}: {message[:200]}")


def _check_logprobs(req: SoakRequest, lp, where: str) -> None:
    """The logprobs of a choice (or of a chunk's tokens): present, finite, <= 0, k alternatives each."""
    k = req.top_logprobs
    if lp is None:
        raise _Lost(f"{where}: logprobs asked for, none given")
    if req.endpoint == "chat":
        entries = lp.get("content") if isinstance(lp, dict) else None
        if not isinstance(entries, list):
            raise _Lost(f"{where}: logprobs.content is not a list")
        values = [e.get("logprob") for e in entries]
        if any(len(e.get("top_logprobs") or []) != k for e in entries):
            raise _Lost(f"{where}: top_logprobs not {k} wide")
    else:
        values, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
        if not isinstance(values, list) or not isinstance(tops, list) or len(tops) != len(values):
            raise _Lost(f"{where}: token_logprobs / top_logprobs malformed")
        # A dict of alternatives keyed by text: tokens that decode alike share a key, so <= k.
        if any(not isinstance(t, dict) or len(t) > k for t in tops):
            raise _Lost(f"{where}: top_logprobs wider than {k}")
    if any(not isinstance(v, (int, float)) or math.isnan(v) or v > 1e-4 for v in values):
        raise _Lost(f"{where}: a logprob is not a number <= 0")


def _judge_json(req: SoakRequest, body, res: RequestResult) -> None:
    if req.behaviour == "invalid":
        raise _Lost("an invalid request was accepted (200)")
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or sorted(c.get("index", -1) for c in choices) != list(range(req.n)):
        raise _Lost(f"choices are not indexed 0..{req.n - 1}")
    for c in choices:
        if c.get("finish_reason") not in FINISH_REASONS:
            raise _Lost(f"choice {c.get('index')}: finish_reason {c.get('finish_reason')!r}")
        text = c.get("message", {}).get("content") if req.endpoint == "chat" else c.get("text")
        if not isinstance(text, str):
            raise _Lost(f"choice {c.get('index')}: no text")
        if req.top_logprobs is not None:
            _check_logprobs(req, c.get("logprobs"), f"choice {c['index']}")
    usage = body.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        raise _Lost("no usage")
    res.set("finished")


async def _judge_stream(req: SoakRequest, r: httpx.Response, res: RequestResult, t0: float) -> None:
    finish: dict[int, str] = {}
    with_logprobs: set[int] = set()
    usage = None
    events = 0
    done = False
    async for line in r.aiter_lines():
        if not line.startswith("data:"):
            continue                              # event separators
        data = line[5:].strip()
        if done:
            raise _Lost("data after [DONE]")
        if data == "[DONE]":
            done = True
            continue
        msg = _json(data.encode())
        if not isinstance(msg, dict):
            raise _Lost("a chunk is not a JSON object")
        if "error" in msg:
            raise _Lost(f"error event in a 200 stream: {str(msg['error'])[:200]}")
        choices = msg.get("choices")
        if not isinstance(choices, list):
            raise _Lost("a chunk without choices")
        if msg.get("usage"):
            usage = msg["usage"]
        for c in choices:
            i = c.get("index")
            if not isinstance(i, int) or not 0 <= i < req.n:
                raise _Lost(f"chunk for choice {i!r} of {req.n}")
            if i in finish:
                raise _Lost(f"choice {i}: a chunk after its finish_reason")
            text = (c.get("delta") or {}).get("content") if req.endpoint == "chat" else c.get("text")
            if res.ttft is None and (text or c.get("finish_reason")):
                res.ttft = time.perf_counter() - t0
            if c.get("logprobs") is not None and req.top_logprobs is not None:
                _check_logprobs(req, c["logprobs"], f"choice {i} chunk")
                with_logprobs.add(i)
            if c.get("finish_reason") is not None:
                if c["finish_reason"] not in FINISH_REASONS:
                    raise _Lost(f"choice {i}: finish_reason {c['finish_reason']!r}")
                finish[i] = c["finish_reason"]
        events += 1
        if req.disconnect_after is not None and events >= req.disconnect_after:
            res.set("cancelled", "disconnect")   # leaving the `async with` closes the connection
            return
    if not done:
        raise _Lost(f"stream ended without [DONE] after {events} events")
    if len(finish) != req.n:
        raise _Lost(f"stream done with {len(finish)} of {req.n} choices finished")
    if req.top_logprobs is not None and len(with_logprobs) != req.n:
        raise _Lost("a streamed choice carried no logprobs")
    if req.include_usage and usage is None:
        raise _Lost("include_usage asked for, no usage chunk")
    res.set("finished")
