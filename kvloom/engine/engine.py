"""The synchronous engine: add requests, call step(), read incremental outputs.

    step():  Scheduler.schedule() -> ModelRunner.execute(plan) -> sample()
             -> Scheduler.update() -> OutputState (text, stops) -> RequestOutput list

It owns no threads; the offline LLM, the server's async engine and cluster
actors all drive it by calling step().
"""
from __future__ import annotations

import dataclasses
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
from kvloom.kv.kv_cache import kv_bytes_per_token, num_blocks_for, staging_capacity
from kvloom.kv.prefix_cache import PrefixCache
from kvloom.kv.session_store import SessionStore
from kvloom.models.loader import load_model
from kvloom.models.model_source import resolve_model
from kvloom.quant import quantize_model
from kvloom.quant.calibration import calibration_pass
from kvloom.sampling_params import SamplingParams
from kvloom.speculation.lookahead import LookaheadSpeculator, SpecSettings
from kvloom.speculation.ngram_trie import DraftTree
from kvloom.speculation.step_cost import StepCost
from kvloom.speculation.verify import verify
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
        self.model, self.hf_config = load_model(self.source, self.dtype, config.max_model_len)
        self.tokenizer = Tokenizer.load(self.source, self.hf_config, config.tokenizer)
        shape = self.model.shape
        bs = config.block_size
        staging = (staging_capacity(config.max_num_seqs, config.max_num_batched_tokens, bs)
                   if config.kv_cache_dtype == "int8" else 0)
        num_blocks = num_blocks_for(config.kv_cache_memory, shape, bs, self.dtype, config.kv_cache_dtype, staging)
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of {bs} tokens "
                f"({kv_bytes_per_token(shape, self.dtype, config.kv_cache_dtype, bs) * bs:.0f} bytes"
                f"{' plus int8 staging' if staging else ''}); raise it", field="kv_cache_memory")
        limit = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        if num_blocks * bs < limit:
            log.warning("KV pool holds %d tokens, less than the context of %d: max_model_len capped",
                        num_blocks * bs, limit)
        # A request that fits max_model_len can always finish alone in the pool.
        self.max_model_len = min(limit, num_blocks * bs)
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks)
        salt = (config.dtype, config.quantization, config.kv_cache_dtype)
        self.prefix_cache = PrefixCache(self.pool, bs, salt=salt) if config.enable_prefix_caching else None
        self.sessions = SessionStore(self.pool, bs, config.session_kv_fraction, config.session_ttl)
        self.scheduler = Scheduler(self.pool, bs, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.prefix_cache, self.sessions)
        self.runner = ModelRunner(self.model, num_blocks, bs, self.dtype, kv_cache_dtype=config.kv_cache_dtype,
                                  num_staging_slots=staging, use_kernels=config.native_kernels)
        self.pool.on_release = self.runner.kv.release
        quantize_model(self.model, config.quantization, config.quantization_group_size, lambda: calibration_pass(self),
                       native_kernels=config.native_kernels)
        self.runner.enable_decode_stack()
        self.speculator = None
        if config.speculative == "lookahead":
            cost = StepCost.measure(self.runner, self.pool, bs, config.max_num_batched_tokens)
            log.info("speculation: forward pass of %s tokens takes %s ms (plain decodes only: %s), +%.1f ms per "
                     "extra chunk, +%.2f us per row and context token", cost.sizes,
                     [round(t * 1e3, 1) for t in cost.seconds], [round(t * 1e3, 1) for t in cost.decode_seconds],
                     cost.per_chunk * 1e3, cost.per_context_token * 1e6)
            self.speculator = LookaheadSpeculator(
                SpecSettings(max_tokens=config.spec_max_tokens, branches=config.spec_branches), cost)
            self.scheduler.speculator = self.speculator
        self._states: dict[str, OutputState] = {}
        self._pending_forks: dict[str, list[Request]] = {}   # parent id -> samples 1..n-1, made at its first token
        self._family: dict[str, list[str]] = {}              # parent id -> ids of all its samples
        self._seeds = random.Random(config.seed)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    session_id: str | None = None) -> str:
        """Queue a request; returns its id. Bad input raises a typed error and changes nothing.

        With params.n > 1 the n samples share the prompt's KV; their outputs carry this id as
        parent_id and their own index.
        """
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._family:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")
        prompt_ids = self._prompt_ids(prompt)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model serves at most {self.max_model_len} "
                f"tokens including at least one generated token")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = arrival_time or time.time()
        samples = [self._new_request(request_id if k == 0 else f"{request_id}#{k}", prompt_ids,
                                     _nth_sample(params, k), max_tokens, arrival, request_id, k, session_id)
                   for k in range(params.n)]
        self._family[request_id] = [r.request_id for r in samples]
        if len(samples) > 1:
            # Samples 1..n-1 fork from sample 0 once its prompt is computed: the prompt's KV is shared.
            self._pending_forks[request_id] = samples[1:]
        self.scheduler.add(samples[0])
        return request_id

    def _new_request(self, rid: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                     arrival: float, parent_id: str, index: int, session_id: str | None) -> Request:
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        req = Request(rid, prompt_ids, params, max_tokens, arrival, generator, parent_id, index, session_id)
        self._states[rid] = OutputState(req, self.tokenizer)
        return req

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
        """Stop a request (all its samples) now and free its blocks. False for an unknown or finished id."""
        family = self._family.pop(request_id, None)
        if family is None:
            return False
        self._pending_forks.pop(request_id, None)
        for rid in family:
            self._states.pop(rid, None)
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
        return True

    def close_session(self, session_id: str) -> bool:
        """Release an agent session's retained KV now. False when the session holds nothing."""
        return self.sessions.release(session_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        logits = self.runner.execute(plan)
        new_tokens, new_logprobs, kept_drafts, first_rows = self._sample(plan, logits)
        self.scheduler.update(plan, new_tokens, kept_drafts)
        requests = [self.scheduler.requests[rid] for rid in new_tokens]
        produced = [(req, new_tokens[req.request_id], new_logprobs[req.request_id]) for req in requests]
        for req in requests:
            for child in self._pending_forks.pop(req.request_id, ()):
                row = first_rows[req.request_id]
                produced.append(self._fork(req, child, logits[row:row + 1]))
        now = time.time()
        outputs = []
        for req, tokens, logprobs in produced:
            state = self._states[req.request_id]
            for used, (token, lp) in enumerate(zip(tokens, logprobs), 1):
                state.add_token(token, lp)
                if state.finish_reason is not None:
                    req.truncate_output(len(req.output_token_ids) - (len(tokens) - used))
                    break
            outputs.append(self._output(req, state, now))
        return outputs

    def _sample(self, plan, logits: torch.Tensor):
        """Next tokens per sampled request: one drawn by the sampler, or those a draft verification accepted."""
        new_tokens: dict[str, list[int]] = {}
        new_logprobs: dict[str, list] = {}
        kept_drafts: dict[str, int] = {}
        first_rows: dict[str, int] = {}
        plain_rows: list[int] = []
        plain_reqs: list[Request] = []
        row = 0
        for c in plan.chunks:
            if not c.sample:
                continue
            req = self.scheduler.requests[c.request_id]
            first_rows[req.request_id] = row
            new_tokens[req.request_id] = []       # keeps plan order
            k = c.num_draft_tokens
            if k:
                tree = DraftTree(c.token_ids[-k:], c.draft_parents)
                tokens, path = verify(logits[row:row + 1 + k], tree, req)
                self.speculator.observe(req, tree, path)
                new_tokens[req.request_id] = tokens
                new_logprobs[req.request_id] = [None] * len(tokens)
                # Accepted drafts along the first branch were written to the slots of their positions.
                kept_drafts[req.request_id] = next((j for j, i in enumerate(path) if i != j), len(path))
            else:
                plain_rows.append(row)
                plain_reqs.append(req)
            row += 1 + k
        if plain_reqs:
            rows = logits if len(plain_rows) == row else logits[torch.tensor(plain_rows)]
            result = sample(rows, plain_reqs)
            for req, token, lp in zip(plain_reqs, result.token_ids, result.logprobs):
                new_tokens[req.request_id] = [token]
                new_logprobs[req.request_id] = [lp]
        return new_tokens, new_logprobs, kept_drafts, first_rows

    def _fork(self, parent: Request, child: Request, logits: torch.Tensor):
        """Start sample `child` from its parent's prompt KV, drawing its first token from the same logits."""
        self.scheduler.fork(parent, child)
        result = sample(logits, [child])
        child.append_output(result.token_ids[0])
        return child, result.token_ids, result.logprobs

    def _output(self, req: Request, state: OutputState, now: float) -> RequestOutput:
        delta_text, delta_ids, delta_lps = state.take_delta()
        finished = state.finish_reason is not None
        if finished:
            status = (RequestStatus.FINISHED_LENGTH if state.finish_reason == "length"
                      else RequestStatus.FINISHED_STOPPED)
            self.scheduler.finish(req.request_id, status)
            del self._states[req.request_id]
            family = self._family.get(req.parent_id)
            if family is not None and all(rid not in self._states for rid in family):
                del self._family[req.parent_id]
        return RequestOutput(
            request_id=req.request_id,
            parent_id=req.parent_id,
            index=req.index,
            num_cached_tokens=req.num_cached_tokens,
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


def _nth_sample(params: SamplingParams, k: int) -> SamplingParams:
    """The k-th of n samples: n=1, and its own seed (seed + k) so the n differ but stay reproducible."""
    if params.n == 1:
        return params
    return dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + k)
