"""OpenAI requests -> engine requests -> OpenAI responses and SSE chunks.

Written against the small engine-client interface of AsyncEngine
(`generate`, `abort`), so tests can drive it with a fake.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.server.metrics import ServerMetrics
from kvloom.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvloom.tokenizer import Tokenizer


@dataclass
class SubRequest:
    """One engine request behind one choice of a response."""

    index: int                 # choice index
    prompt_ids: list[int]
    prompt_text: str | None    # for echo
    params: SamplingParams


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages for the template; list-of-parts content is flattened to its text parts."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            parts = [p.get("text", "") for p in content if p.get("type") == "text"]
            if len(parts) != len(content):
                raise InvalidRequestError("only text content parts are supported", field="messages")
            content = "".join(parts)
        out.append({**m.model_dump(exclude_none=True), "content": content or ""})
    return out


def sampling_params(req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        n=1,
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )


def _fan_out(prompts: list[tuple[list[int], str | None]], params: SamplingParams, n: int) -> list[SubRequest]:
    """n choices per prompt, each with its own seed (seed + k) so they differ but stay reproducible."""
    if not isinstance(n, int) or n < 1:
        raise InvalidRequestError("n must be an integer >= 1", field="n")
    subs = []
    for p_idx, (ids, text) in enumerate(prompts):
        for k in range(n):
            seed = None if params.seed is None else params.seed + k
            subs.append(SubRequest(p_idx * n + k, ids, text, _with_seed(params, seed)))
    return subs


def _with_seed(params: SamplingParams, seed):
    return params if seed == params.seed else dataclasses.replace(params, seed=seed)


class OpenAIServing:
    def __init__(self, engine, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 metrics: ServerMetrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics

    # ---- request translation ---------------------------------------------------------

    def chat_subrequests(self, req: ChatCompletionRequest) -> list[SubRequest]:
        ids = self.tokenizer.apply_chat_template(message_dicts(req.messages), req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", field="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return _fan_out([(ids, None)], sampling_params(req, max_tokens, logprobs), req.n)

    def completion_subrequests(self, req: CompletionRequest) -> list[SubRequest]:
        p = req.prompt
        if isinstance(p, str):
            raw = [p]
        elif p and all(isinstance(x, int) for x in p):
            raw = [p]
        else:
            raw = list(p)
        if not raw:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        prompts = []
        for item in raw:
            if isinstance(item, str):
                if not item:
                    raise InvalidRequestError("the prompt is empty", field="prompt")
                prompts.append((self.tokenizer.encode(item), item))
            else:
                prompts.append((list(item), None))
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise InvalidRequestError("logprobs must be in [0, 5] for completions", field="logprobs")
        return _fan_out(prompts, sampling_params(req, req.max_tokens, req.logprobs), req.n)

    # ---- running ---------------------------------------------------------------------

    async def stream_outputs(self, subs: list[SubRequest]) -> AsyncIterator[tuple[SubRequest, RequestOutput]]:
        """All sub-requests' outputs as they come, merged. Cancelling the consumer aborts them all."""
        merged: asyncio.Queue = asyncio.Queue()
        arrival = time.time()
        first_token: dict[int, float] = {}

        async def pump(sub: SubRequest):
            try:
                async for out in self.engine.generate(sub.prompt_ids, sub.params):
                    if sub.index not in first_token and out.token_ids:
                        first_token[sub.index] = time.time()
                    await merged.put((sub, out))
                    if out.finished:
                        self.metrics.observe_finished("success", arrival, first_token.get(sub.index), time.time(),
                                                      len(out.token_ids))
            except asyncio.CancelledError:
                self.metrics.observe_finished("abort", arrival, first_token.get(sub.index), time.time(), 0)
                raise
            except BaseException as e:
                await merged.put((sub, e))

        tasks = [asyncio.create_task(pump(s)) for s in subs]
        try:
            done = 0
            while done < len(subs):
                sub, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    done += 1
                yield sub, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def accepted(self, subs: list[SubRequest]):
        """Start the stream and wait for the first output, so validation errors surface before any
        byte of a 200 response is sent."""
        stream = self.stream_outputs(subs)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in subs))
        return first, stream

    # ---- responses -------------------------------------------------------------------

    def _token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _chat_logprobs(self, lps) -> dict | None:
        if lps is None:
            return None
        def entry(tid, lp):
            s = self._token_str(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                            for x in lps]}

    def _completion_logprobs(self, lps, text_offset: int) -> dict | None:
        if lps is None:
            return None
        tokens, offsets, off = [], [], text_offset
        for x in lps:
            s = self._token_str(x.token_id)
            tokens.append(s)
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self._token_str(t): v for t, v in x.top} for x in lps], "text_offset": offsets}

    @staticmethod
    def _usage(subs: list[SubRequest], outs: dict[int, RequestOutput]) -> dict:
        # n choices of one prompt share it: count each distinct prompt once, as OpenAI does.
        prompt = sum(len(ids) for ids in {id(s.prompt_ids): s.prompt_ids for s in subs}.values())
        completion = sum(len(o.token_ids) for o in outs.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _collect(self, first, stream) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        if first is not None:
            sub, out = first
            if out.finished:
                finals[sub.index] = out
        async for sub, out in stream:
            if out.finished:
                finals[sub.index] = out
        return finals

    async def chat_response(self, subs, first, stream) -> dict:
        finals = await self._collect(first, stream)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "logprobs": self._chat_logprobs(o.logprobs), "finish_reason": o.finish_reason}
                   for i, o in sorted(finals.items())]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(subs, finals)}

    async def completion_response(self, subs, first, stream, echo: bool) -> dict:
        finals = await self._collect(first, stream)
        by_index = {s.index: s for s in subs}
        choices = []
        for i, o in sorted(finals.items()):
            prefix = self._echo_text(by_index[i]) if echo else ""
            choices.append({"index": i, "text": prefix + o.text, "finish_reason": o.finish_reason,
                            "logprobs": self._completion_logprobs(o.logprobs, len(prefix))})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(subs, finals)}

    def _echo_text(self, sub: SubRequest) -> str:
        return sub.prompt_text if sub.prompt_text is not None else self.tokenizer.decode(sub.prompt_ids)

    async def chat_stream(self, subs, first, stream, include_usage: bool) -> AsyncIterator[str]:
        chunk = _SSE(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk", self.model_name, include_usage)

        for s in subs:
            yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        finals: dict[int, RequestOutput] = {}
        async for sub, out in _chain(first, stream):
            if out.delta_text or out.finished or out.delta_logprobs:
                delta = {"content": out.delta_text} if out.delta_text else {}
                yield chunk([{"index": sub.index, "delta": delta,
                              "logprobs": self._chat_logprobs(out.delta_logprobs) if out.delta_logprobs else None,
                              "finish_reason": out.finish_reason}])
            if out.finished:
                finals[sub.index] = out
        if include_usage:
            yield chunk([], self._usage(subs, finals))
        yield "data: [DONE]\n\n"

    async def completion_stream(self, subs, first, stream, include_usage: bool, echo: bool) -> AsyncIterator[str]:
        chunk = _SSE(f"cmpl-{uuid.uuid4().hex}", "text_completion", self.model_name, include_usage)

        if echo:
            for s in subs:
                yield chunk([{"index": s.index, "text": self._echo_text(s), "logprobs": None, "finish_reason": None}])
        finals: dict[int, RequestOutput] = {}
        offsets: dict[int, int] = {}
        async for sub, out in _chain(first, stream):
            if out.delta_text or out.finished or out.delta_logprobs:
                off = offsets.get(sub.index, 0)
                offsets[sub.index] = off + len(out.delta_text)
                yield chunk([{"index": sub.index, "text": out.delta_text, "finish_reason": out.finish_reason,
                              "logprobs": self._completion_logprobs(out.delta_logprobs, off)
                              if out.delta_logprobs else None}])
            if out.finished:
                finals[sub.index] = out
        if include_usage:
            yield chunk([], self._usage(subs, finals))
        yield "data: [DONE]\n\n"


class _SSE:
    """Formats one stream's chunks: `data: {json}` with the fields every chunk repeats."""

    def __init__(self, rid: str, obj: str, model: str, include_usage: bool):
        self.head = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
        self.include_usage = include_usage

    def __call__(self, choices: list, usage: dict | None = None) -> str:
        body = {**self.head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _chain(first, stream):
    if first is not None:
        yield first
    async for item in stream:
        yield item
