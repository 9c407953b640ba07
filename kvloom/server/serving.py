"""OpenAI requests -> engine requests -> OpenAI responses and SSE chunks.

Written against the small engine-client interface of AsyncEngine
(`generate`, `abort`), so tests can drive it with a fake.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
import dataclasses
from dataclasses import dataclass, field

from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError, KvloomError, RequestFailedError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.offline import base_seed, round_params, to_sample
from kvloom.scaling.search import Placement, SearchResult
from kvloom.scaling.search_spec import SearchSpec
from kvloom.scaling.spec import ScalingSpec
from kvloom.scaling.strategy import Strategy
from kvloom.server.async_engine import EngineDeadError
from kvloom.server.metrics import ServerMetrics
from kvloom.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from kvloom.structured.api_fields import constraint_from_request
from kvloom.structured.backend import validate
from kvloom.structured.chat_output import ChoiceOutput
from kvloom.structured.reasoning import reasoning_parser
from kvloom.structured.spec import StructuredOutputs
from kvloom.structured.tool_parsers import parser_for
from kvloom.structured.tools import (ToolSetup, apply_template, check_tools, forced_constraint, output_parser,
                                     renders_tools, template_messages)
from kvloom.tokenizer import Tokenizer


@dataclass
class SubRequest:
    """One engine request (one prompt, n samples) behind n choices of a response."""

    first_choice: int          # choice index of its sample 0; sample k is first_choice + k
    prompt_ids: list[int]
    prompt_text: str | None    # for echo
    params: SamplingParams
    session_id: str | None = None
    cache_salt: str | None = None   # the tenant's: its prefix-cache blocks are never shared with other salts
    response_id: str = ""      # the id the client sees (chatcmpl-..., cmpl-...)
    request_id: str | None = None   # the engine's: the response id, or "<response id>-<k>" for prompt k of several
    priority: int = 0          # vLLM's: lower runs first
    tools: ToolSetup | None = None   # chat: the tools and tool_choice its output is parsed by
    lora: str | None = None    # the LoRA adapter the request's `model` names (None: the base model)
    scaling: ScalingSpec | None = None   # best_of / vote / adaptive: its samples run in rounds (kvloom/scaling)
    strategy: Strategy | None = None     # the running strategy of a scaled request
    tokens_drawn: dict[int, int] = field(default_factory=dict)   # scaled: sample -> tokens drawn (aborted too)
    search: SearchSpec | None = None     # beam search / guided search: one search program on the engine thread
    question: str | None = None          # guided search grades answers to it (chat: the last user turn)
    search_result: SearchResult | None = None


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


def sampling_params(req, max_tokens: int | None, logprobs: int | None, n: int,
                    constraint: StructuredOutputs | None = None) -> SamplingParams:
    return SamplingParams(
        n=n,
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
        structured_outputs=constraint,
    )


def _fan_out(prompts: list[tuple[list[int], str | None]], params: SamplingParams, req,
             response_id: str) -> list[SubRequest]:
    """One engine request per prompt; its n samples share the prompt's KV in the engine. The engine ids
    derive from the response id, so ops tools (/server_info, /admin/migrate) speak the client's ids.
    A scaled request (best_of, vote, adaptive) draws its samples in rounds; its choices are picked at the end.
    A searched one (beam search, guided search) runs one search program per prompt."""
    spec = _scaling(req)
    search = SearchSpec.from_request(req, spec.kind if spec is not None else None)
    many = len(prompts) > 1
    width = spec.num_samples if spec is not None else params.n
    return [SubRequest(i * width, ids, text, params, req.session_id, req.cache_salt, response_id,
                       f"{response_id}-{i}" if many else response_id, req.priority, scaling=spec, search=search)
            for i, (ids, text) in enumerate(prompts)]


def _scaling(req) -> ScalingSpec | None:
    spec = ScalingSpec.from_fields(req.n, req.best_of, req.vote, req.adaptive, req.scorer)
    if spec is not None and req.stream:
        raise InvalidRequestError(f"{spec.kind} picks its choices once every sample is done: it cannot stream",
                                  field="stream")
    if spec is not None and getattr(req, "echo", False):
        raise InvalidRequestError(f"echo cannot be combined with {spec.kind}", field="echo")
    return spec


class OpenAIServing:
    def __init__(self, engine, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 metrics: ServerMetrics):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        # --tool-call-parser / --reasoning-parser reach here as attributes of the engine (set by launch.serve):
        # the app builds this object from the engine alone.
        core = getattr(engine, "engine", engine)
        self.tool_parser = parser_for(getattr(core, "tool_call_parser", None), tokenizer.hf.chat_template)
        self.reasoning = reasoning_parser(getattr(core, "reasoning_parser", None))
        self.template_renders_tools = renders_tools(tokenizer.hf)

    # ---- request translation ---------------------------------------------------------

    def chat_subrequests(self, req: ChatCompletionRequest) -> list[SubRequest]:
        setup = check_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        constraint = constraint_from_request(req)
        if setup.forced:   # tool_choice required / named: a grammar makes the output a valid call
            if constraint is not None:
                raise InvalidRequestError("an output constraint cannot be combined with tool_choice "
                                          f"{setup.choice}", field="tool_choice")
            constraint = forced_constraint(setup)
            try:
                validate(constraint)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"a tool's parameters are not a JSON schema this server can enforce: {e}",
                                          field="tools") from e
        messages = template_messages(message_dicts(req.messages), setup, self.tool_parser,
                                     self.template_renders_tools)
        ids = apply_template(self.tokenizer, messages, setup.tools if setup.active and self.template_renders_tools
                             else None, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", field="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        subs = _fan_out([(ids, None)], sampling_params(req, max_tokens, logprobs, req.n, constraint), req,
                        f"chatcmpl-{uuid.uuid4().hex}")
        question = next((m["content"] for m in reversed(message_dicts(req.messages)) if m["role"] == "user"), "")
        for sub in subs:
            sub.tools = setup
            sub.question = question
        return self._checked_search(subs)

    def _choice_output(self, subs: list[SubRequest]) -> ChoiceOutput:
        setup = subs[0].tools
        parser = output_parser(setup, self.tool_parser) if setup is not None else None
        return ChoiceOutput(parser, self.reasoning, setup.parallel if setup is not None else True)

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
        params = sampling_params(req, req.max_tokens, req.logprobs, req.n, constraint_from_request(req))
        return self._checked_search(_fan_out(prompts, params, req, f"cmpl-{uuid.uuid4().hex}"))

    def _checked_search(self, subs: list[SubRequest]) -> list[SubRequest]:
        """A search's settings against this server (its engine's max_num_seqs; a cluster runs no search)."""
        if subs[0].search is None:
            return subs
        core = getattr(self.engine, "engine", None)
        if not hasattr(self.engine, "run_search") or core is None:
            raise InvalidRequestError("beam search and guided search run on a single engine; this server runs "
                                      "several instances (--instances)", field="use_beam_search"
                                      if subs[0].search.kind == "beam_search" else "guided_search")
        for sub in subs:
            sub.search.check(sub.params, core.config.max_num_seqs)
        return subs

    # ---- running ---------------------------------------------------------------------

    async def stream_outputs(self, subs: list[SubRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of every sample as they come, merged. Cancelling the consumer aborts all."""
        merged: asyncio.Queue = asyncio.Queue()
        arrival = time.time()

        async def pump(sub: SubRequest):
            first_token: dict[int, float] = {}
            try:
                outputs = (self._scaled(sub) if sub.scaling is not None else self._searched(sub)
                           if sub.search is not None else self._samples(sub))
                async for index, out in outputs:
                    if index not in first_token and out.token_ids:
                        first_token[index] = time.time()
                    await merged.put((sub.first_choice + index, out))
                    if out.finished:
                        self.metrics.observe_finished("success", arrival, first_token.get(index), time.time(),
                                                      len(out.token_ids))
                await merged.put((sub.first_choice, _DONE))
            except asyncio.CancelledError:
                self.metrics.observe_finished("abort", arrival, min(first_token.values(), default=None),
                                              time.time(), 0)
                raise
            except BaseException as e:
                if isinstance(e, (RequestFailedError, EngineDeadError)):
                    self.metrics.requests.labels(outcome="error").inc()
                await merged.put((sub.first_choice, e))

        tasks = [asyncio.create_task(pump(s)) for s in subs]
        try:
            left = len(subs)
            while left:
                choice, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    left -= 1
                    continue
                yield choice, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _samples(self, sub: SubRequest, params: SamplingParams | None = None, request_id: str | None = None):
        """(sample index, output) of one engine request's samples."""
        return _indexed(self.engine.generate(sub.prompt_ids, params or sub.params, request_id=request_id or
                                             sub.request_id, session_id=sub.session_id, cache_salt=sub.cache_salt,
                                             priority=sub.priority, lora=sub.lora))

    async def _scaled(self, sub: SubRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
        """A scaled request's samples, round by round (each round one engine request sharing the prompt's KV);
        once the strategy has seen enough, the round's unfinished samples are aborted."""
        strategy = sub.strategy = Strategy(sub.scaling, sub.prompt_text or sub.prompt_ids)
        seed = base_seed(sub.params)
        while size := strategy.next_round():
            first = strategy.drawn - size
            samples = self._samples(sub, round_params(sub.params, sub.scaling, size, first, seed),
                                    f"{sub.request_id}-s{first}")
            try:
                async for index, out in samples:
                    sub.tokens_drawn[first + index] = len(out.token_ids)
                    yield first + index, out
                    if out.finished and strategy.observe(to_sample(first + index, out)):
                        break
            finally:
                await samples.aclose()      # aborts the round's samples still running

    async def _searched(self, sub: SubRequest) -> AsyncIterator[tuple[int, RequestOutput]]:
        """A searched request's choices (best first), once its search program has run on the engine thread;
        cancelled, the search's samples are aborted there."""
        question = sub.question if sub.question is not None else (
            sub.prompt_text if sub.prompt_text is not None else self.tokenizer.decode(sub.prompt_ids))
        program = sub.search.program(sub.prompt_ids, sub.params, sub.request_id,
                                     Placement(sub.cache_salt, sub.priority, sub.lora), question, self.tokenizer,
                                     self.max_model_len)
        result = sub.search_result = await self.engine.run_search(program)
        sub.tokens_drawn[0] = result.tokens_drawn
        for out in result.choices:
            yield out.index, out

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
        # n choices of one prompt share it: each prompt counts once, as OpenAI counts it. A scaled request
        # counts every token it drew, the samples not returned and the aborted ones too.
        prompt = sum(len(s.prompt_ids) for s in subs)
        completion = (sum(sum(s.tokens_drawn.values()) for s in subs)
                      if subs[0].scaling is not None or subs[0].search is not None
                      else sum(len(o.token_ids) for o in outs.values()))
        cached = sum({o.parent_id: o.num_cached_tokens for o in outs.values()}.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _collect(self, first, stream) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for choice, out in _chain(first, stream):
            if out.finished:
                finals[choice] = out
        return finals

    @staticmethod
    def _scaled_choices(subs: list[SubRequest], finals: dict[int, RequestOutput]
                        ) -> tuple[dict[int, RequestOutput], dict | None]:
        """The choices a scaled or searched request returns (its strategy's picks, its search's best) and its
        `kvloom` object (one prompt's report, or {"prompts": [...]} for several); others' finals as they are."""
        if subs[0].scaling is None and subs[0].search is None:
            return finals, None
        chosen, reports = {}, []
        for i, sub in enumerate(subs):
            if sub.search is not None:
                chosen.update((sub.first_choice + out.index, out) for out in sub.search_result.choices)
                reports.append(sub.search_result.extension)
                continue
            for j, s in enumerate(sub.strategy.chosen()):
                out = s.output if sub.params.logprobs is not None else dataclasses.replace(s.output, logprobs=None)
                chosen[i * sub.scaling.n + j] = out
            reports.append(sub.strategy.extension(sum(sub.tokens_drawn.values())))
        return chosen, reports[0] if len(reports) == 1 else {"prompts": reports}

    async def chat_response(self, subs, first, stream) -> dict:
        finals = await self._collect(first, stream)
        picked, report = self._scaled_choices(subs, finals)
        choices = []
        for i, o in sorted(picked.items()):
            message, finish = self._choice_output(subs).message(o.text, o.finish_reason)
            choices.append({"index": i, "message": message, "logprobs": self._chat_logprobs(o.logprobs),
                            "finish_reason": finish})
        body = {"id": subs[0].response_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(subs, finals)}
        return body if report is None else {**body, "kvloom": report}

    async def completion_response(self, subs, first, stream, echo: bool) -> dict:
        finals = await self._collect(first, stream)
        picked, report = self._scaled_choices(subs, finals)
        choices = []
        for i, o in sorted(picked.items()):
            prefix = self._echo_text(self._sub_of(subs, i)) if echo else ""
            choices.append({"index": i, "text": prefix + o.text, "finish_reason": o.finish_reason,
                            "logprobs": self._completion_logprobs(o.logprobs, len(prefix))})
        body = {"id": subs[0].response_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(subs, finals)}
        return body if report is None else {**body, "kvloom": report}

    @staticmethod
    def _sub_of(subs: list[SubRequest], choice: int) -> SubRequest:
        return next(s for s in subs if s.first_choice <= choice < s.first_choice + s.params.n)

    def _echo_text(self, sub: SubRequest) -> str:
        return sub.prompt_text if sub.prompt_text is not None else self.tokenizer.decode(sub.prompt_ids)

    async def chat_stream(self, subs, first, stream, include_usage: bool) -> AsyncIterator[str]:
        chunk = _SSE(subs[0].response_id, "chat.completion.chunk", self.model_name, include_usage)

        for s in subs:
            for k in range(s.params.n):
                yield chunk([{"index": s.first_choice + k, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        finals: dict[int, RequestOutput] = {}
        parsers: dict[int, ChoiceOutput] = {}
        try:
            async for choice, out in _chain(first, stream):
                if out.delta_text or out.finished or out.delta_logprobs:
                    parsed = parsers.setdefault(choice, self._choice_output(subs))
                    delta = parsed.delta(out.delta_text, out.finished)
                    finish = out.finish_reason
                    if finish == "stop" and parsed.called_tools:
                        finish = "tool_calls"
                    if not (delta or out.finished or out.delta_logprobs):
                        continue    # text held back while it may open a tool call or close reasoning
                    yield chunk([{"index": choice, "delta": delta,
                                  "logprobs": self._chat_logprobs(out.delta_logprobs) if out.delta_logprobs
                                  else None, "finish_reason": finish}])
                if out.finished:
                    finals[choice] = out
        except KvloomError as e:  # after the 200 is sent: the error goes in the stream
            yield _sse_error(e)
            return
        finally:
            await stream.aclose()
        if include_usage:
            yield chunk([], self._usage(subs, finals))
        yield "data: [DONE]\n\n"

    async def completion_stream(self, subs, first, stream, include_usage: bool, echo: bool) -> AsyncIterator[str]:
        chunk = _SSE(subs[0].response_id, "text_completion", self.model_name, include_usage)

        if echo:
            for s in subs:
                for k in range(s.params.n):
                    yield chunk([{"index": s.first_choice + k, "text": self._echo_text(s), "logprobs": None,
                                  "finish_reason": None}])
        finals: dict[int, RequestOutput] = {}
        offsets: dict[int, int] = {}
        try:
            async for choice, out in _chain(first, stream):
                if out.delta_text or out.finished or out.delta_logprobs:
                    off = offsets.get(choice, 0)
                    offsets[choice] = off + len(out.delta_text)
                    yield chunk([{"index": choice, "text": out.delta_text, "finish_reason": out.finish_reason,
                                  "logprobs": self._completion_logprobs(out.delta_logprobs, off)
                                  if out.delta_logprobs else None}])
                if out.finished:
                    finals[choice] = out
        except KvloomError as e:  # after the 200 is sent: the error goes in the stream
            yield _sse_error(e)
            return
        finally:
            await stream.aclose()
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


def _sse_error(e: KvloomError) -> str:
    kind = "server_error" if isinstance(e, (EngineDeadError, RequestFailedError)) else "invalid_request_error"
    body = {"error": {"message": str(e), "type": kind, "param": getattr(e, "field", None), "code": None}}
    return f"data: {json.dumps(body)}\n\n"


_DONE = object()   # a pump's last item: all its samples are done


async def _indexed(outputs) -> AsyncIterator[tuple[int, RequestOutput]]:
    try:
        async for out in outputs:
            yield out.index, out
    finally:
        await outputs.aclose()      # at once: the engine request's unfinished samples are aborted now


async def _chain(first, stream):
    if first is not None:
        yield first
    async for item in stream:
        yield item
