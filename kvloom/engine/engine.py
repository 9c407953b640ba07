"""The synchronous engine: add requests, call step(), read incremental outputs.

    step():  Scheduler.schedule() -> ModelRunner.execute(plan) -> sample()
             -> Scheduler.update() -> OutputState (text, stops) -> RequestOutput list

It owns no threads; the offline LLM, the server's async engine and cluster
actors all drive it by calling step().
"""
from __future__ import annotations

import logging
import random
import time
import uuid

import torch

from kvloom.config import EngineConfig
from kvloom.engine.model_runner import ModelRunner
from kvloom.engine.output_processor import OutputState
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.sampler import sample
from kvloom.engine.scheduler import Scheduler
from kvloom.errors import InvalidRequestError, PromptTooLongError
from kvloom.kv.block_pool import BlockPool
from kvloom.kv.kv_cache import num_blocks_for
from kvloom.models.loader import load_model
from kvloom.models.model_source import resolve_model
from kvloom.sampling_params import SamplingParams
from kvloom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.source = resolve_model(config.model)
        self.dtype = _DTYPES[config.dtype]
        self.model, self.hf_config = load_model(self.source, self.dtype, config.block_size, config.max_model_len)
        self.tokenizer = Tokenizer.load(self.source, self.hf_config, config.tokenizer)
        shape = self.model.shape
        bs = config.block_size
        num_blocks = num_blocks_for(config.kv_cache_memory, shape, bs, self.dtype)
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of {bs} tokens "
                f"({shape.kv_bytes_per_token(self.dtype) * bs} bytes); raise it", field="kv_cache_memory")
        limit = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        if num_blocks * bs < limit:
            log.warning("KV pool holds %d tokens, less than the context of %d: max_model_len capped",
                        num_blocks * bs, limit)
        # A request that fits max_model_len can always finish alone in the pool.
        self.max_model_len = min(limit, num_blocks * bs)
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(self.pool, bs, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, bs, self.dtype)
        self._states: dict[str, OutputState] = {}
        self._seeds = random.Random(config.seed)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; returns its id. Bad input raises a typed error and changes nothing."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")
        prompt_ids = self._prompt_ids(prompt)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model serves at most {self.max_model_len} "
                f"tokens including at least one generated token")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        req = Request(request_id, prompt_ids, params, max_tokens, arrival_time or time.time(), generator)
        self._states[request_id] = OutputState(req, self.tokenizer)
        self.scheduler.add(req)
        return request_id

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", field="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidRequestError("token-id prompts must be lists of integers", field="prompt")
            vocab = self.model.shape.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                          field="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. Returns False for an unknown or finished id."""
        self._states.pop(request_id, None)
        return self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        logits = self.runner.execute(plan)
        sampled_chunks = [c for c in plan.chunks if c.sample]
        reqs = [self.scheduler.requests[c.request_id] for c in sampled_chunks]
        result = sample(logits, reqs)
        self.scheduler.update(plan, {r.request_id: t for r, t in zip(reqs, result.token_ids)})
        now = time.time()
        outputs = []
        for req, token, lp in zip(reqs, result.token_ids, result.logprobs):
            state = self._states[req.request_id]
            state.add_token(token, lp)
            outputs.append(self._output(req, state, now))
        return outputs

    def _output(self, req: Request, state: OutputState, now: float) -> RequestOutput:
        delta_text, delta_ids, delta_lps = state.take_delta()
        finished = state.finish_reason is not None
        if finished:
            status = (RequestStatus.FINISHED_LENGTH if state.finish_reason == "length"
                      else RequestStatus.FINISHED_STOPPED)
            self.scheduler.finish(req.request_id, status)
            del self._states[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            delta_logprobs=delta_lps,
            text=state.text[:state.emitted_chars],
            token_ids=list(req.output_token_ids),
            logprobs=None if state.logprobs is None else list(state.logprobs),
            finished=finished,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
            metrics={"arrival_time": req.arrival_time, "first_scheduled_time": req.first_scheduled_time,
                     "now": now, "num_preemptions": req.num_preemptions},
        )
