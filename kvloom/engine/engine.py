"""The synchronous engine: add requests, call step(), read incremental outputs.

    step():  Scheduler.schedule() -> ModelRunner.execute(plan) (forward pass and sampling)
             -> Scheduler.update() -> OutputState (text, stops) -> RequestOutput list

It owns no threads; the offline LLM, the server's async engine and cluster
actors all drive it by calling step(). Requests can leave and join between
steps (export_request / import_request): see engine/snapshot.py.

Built in explicit phases, each reading only what the earlier ones made:
load -> quantize (calibration included) -> size and allocate the KV pool ->
attention backends (the native decode stack over the final weights) -> measure
(speculation's step-cost model). The config stays frozen throughout.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import time
import uuid

import torch

from kvloom.config import EngineConfig
from kvloom.engine.faults import FaultPlan
from kvloom.engine.model_runner import ModelRunner
from kvloom.engine.output_processor import OutputState
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.sampler import TokenLogprobs
from kvloom.engine.scheduler import Scheduler
from kvloom.engine.snapshot import KVBlocks, RequestSnapshot, SampleSnapshot
from kvloom.engine.tpot_target import TpotTarget
from kvloom.errors import InvalidRequestError, KvloomError, PromptTooLongError
from kvloom.kernels import kernels
from kvloom.kv.block_pool import BlockPool
from kvloom.kv.kv_cache import kv_bytes_per_token, num_blocks_for, pool_dtype, staging_capacity
from kvloom.kv.window_pages import WindowPages
from kvloom.kv.windowed_kv_cache import LayerGroups
from kvloom.kv.prefix_cache import PrefixCache, salt_bytes
from kvloom.kv.session_store import SessionStore
from kvloom.finetune.cotrainer import CoTrainer
from kvloom.lora import LoraAdapter, LoraManager
from kvloom.models.gguf_weights import FLOAT_TYPES
from kvloom.models.loader import load_model, materialize_deferred
from kvloom.models.moe import has_experts
from kvloom.models.model_source import resolve_model
from kvloom.quant import quantize_model
from kvloom.quant.calibration import calibration_pass
from kvloom.sampling_params import SamplingParams
from kvloom.speculation.lookahead import LookaheadSpeculator, SpecSettings
from kvloom.speculation.ngram_trie import DraftTree
from kvloom.speculation.step_cost import StepCost
from kvloom.structured.backend import validate as validate_constraint
from kvloom.structured.compiler import GrammarCompiler
from kvloom.structured.matcher import RequestMatcher
from kvloom.system_info import inference_paths
from kvloom.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def auto_quantization(projection_types: set[str], has_4bit_blocks: bool, integer_kernels: bool) -> str:
    """What quantization "auto" runs, from a GGUF's projection weight types (empty for safetensors)."""
    if not integer_kernels or not projection_types - FLOAT_TYPES:
        return "none"
    return "gguf" if has_4bit_blocks else "w8a8"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # The step's threads: what every thread that starts computing gets (a server's event loop, which
        # hands its compute to the engine's thread, later runs on one: engine/openmp_pool.py).
        self.compute_threads = torch.get_num_threads()
        self._load()
        self._size_kv_pool()
        self._build_scheduler_and_runner()
        config = self.config                   # quantization "auto" is resolved by now
        quantize_model(self.model, config.quantization, config.quantization_group_size,
                       lambda: calibration_pass(self), native_kernels=config.native_kernels)
        self.lora = self._lora_manager()        # LoRA slot tables over the final weights, before the stack reads them
        self.trainer = (CoTrainer(self, config.fine_tuning_dir, config.fine_tuning_step_ms)
                        if config.enable_fine_tuning else None)
        self.runner.enable_decode_stack()      # backends that read the weights are built over the final ones
        self.speculator = self._measure_speculation() if config.speculative == "lookahead" else None
        self.scheduler.speculator = self.speculator
        self.tpot = TpotTarget(config.tpot_target_ms / 1e3) if config.tpot_target_ms else None
        self.scheduler.tpot = self.tpot
        self._last_step: tuple | None = None   # (decodes, other tokens, start, end): the TPOT fit's next point
        self._states: dict[str, OutputState] = {}
        self._pending_forks: dict[str, list[Request]] = {}   # parent id -> samples 1..n-1, made at its first token
        self._family: dict[str, list[str]] = {}              # parent id -> ids of all its samples
        self._tenant_salt: dict[str, str | None] = {}        # parent id -> its cache_salt as given
        self._seeds = random.Random(config.seed)
        self._grammars: GrammarCompiler | None = None        # made at the first constrained request
        self._awaiting_grammar: dict[str, tuple] = {}        # parent id -> (grammar future, its samples)
        self.faults: FaultPlan | None = FaultPlan.from_env()  # injected faults, tests only (engine/faults.py)
        paths = inference_paths(self)
        log.info("inference paths: kernels %s (%s), attention %s%s, linear %s",
                 "on" if paths["kernels"]["native_kernels"] else "off", paths["kernels"].get("isa")
                 or paths["kernels"].get("reason"), paths["attention_backends"],
                 "".join(f"; {name} off: {why}" for name, why in paths["inactive_backends"].items()),
                 paths["linear_kernels"])

    # ---- build phases ---------------------------------------------------------------------

    def _load(self) -> None:
        self.source = resolve_model(self.config.model)
        self.dtype = _DTYPES[self.config.dtype]
        keep_blocks = self.config.quantization in ("auto", "gguf") and bool(self.source.gguf_file)
        self.model, self.hf_config = load_model(self.source, self.dtype, self.config.max_model_len, keep_blocks)
        self.config = dataclasses.replace(self.config, quantization=self._resolve_quantization())
        self.config = dataclasses.replace(self.config, kv_cache_dtype=self._resolve_kv_cache_dtype())
        self.tokenizer = Tokenizer.load(self.source, self.hf_config, self.config.tokenizer)

    def _resolve_kv_cache_dtype(self) -> str:
        """auto -> float16 when float32 weights run quantized and the vector attention kernels read the pool
        (llama.cpp's default: half the bytes each decode reads; perplexity in docs/performance.md), else the
        model's own dtype: the reference mode (--quantization none) keeps float32 KV and stays exact to
        transformers, and sliding-window layers or other head sizes, which take the portable loop, keep it
        too (there float16 rows cost more to widen than they save: Gemma 3 270M's 512-token prefill went
        0.49-0.67 s -> 1.55-1.74 s, docs/results/kv_float16/gemma3/)."""
        asked, shape = self.config.kv_cache_dtype, self.model.shape
        if asked != "auto":
            return asked
        if self.config.quantization == "none" or self.config.dtype != "float32":
            return self.config.dtype
        native, window = self.config.native_kernels and kernels() is not None, getattr(shape, "sliding_window", None)
        if native and shape.head_dim in (64, 128) and window is None:   # what the vector kernels read
            return "float16"
        log.info("KV cache: auto keeps float32 (the attention takes the portable loop here: head size %d, "
                 "sliding window %s, native kernels %s)", shape.head_dim, window, "on" if native else "off")
        return "float32"

    def _resolve_quantization(self) -> str:
        """auto -> the integer path nearest the file's own precision: gguf for a GGUF's 4-bit projections,
        w8a8 for 8-bit (or 5-6 bit) ones, both only on the native kernels (elsewhere they are slower than
        float); float weights (safetensors, F16/F32 GGUF) run as stored: none, the reference mode."""
        asked = self.config.quantization
        if asked == "gguf" and not self.source.gguf_file:
            raise KvloomError(f"quantization gguf needs a GGUF model; {self.source.name} is not one")
        if asked != "auto":
            return asked
        integer_ok = self.config.dtype == "float32" and self.config.native_kernels and kernels() is not None
        types, blocks = self.model.gguf_projection_types, bool(self.model.gguf_deferred)
        chosen = auto_quantization(types, blocks, integer_ok)
        if chosen == "none" and auto_quantization(types, blocks, True) != "none":
            log.warning("quantization auto: %s runs as stored in float (its integer kernels need float32 and the "
                        "native kernels)", self.source.name)
        if chosen != "gguf":
            materialize_deferred(self.model)     # the float path needs the 4-bit projections dequantised
            self.model.gguf_blocks = {}
        return chosen

    def _size_kv_pool(self) -> None:
        config, shape, bs = self.config, self.model.shape, self.config.block_size
        self.num_staging_slots = (staging_capacity(config.max_num_seqs, config.max_num_batched_tokens, bs)
                                  if config.kv_cache_dtype == "int8" else 0)
        num_blocks = num_blocks_for(config.kv_cache_memory, shape, bs, self.dtype, config.kv_cache_dtype,
                                    self.num_staging_slots)
        self.layer_groups = self._windowed_layout(num_blocks)
        if self.layer_groups is not None:
            page = self.layer_groups.page_bytes(shape, pool_dtype(config.kv_cache_dtype, self.dtype), bs)
            self.num_blocks = config.kv_cache_memory // page
            longest = self.layer_groups.longest_context(self.num_blocks, shape.sliding_window, bs)
            self.max_model_len = min(config.max_model_len or shape.max_position_embeddings,
                                     shape.max_position_embeddings, longest)
            return
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of {bs} tokens "
                f"({kv_bytes_per_token(shape, self.dtype, config.kv_cache_dtype, bs) * bs:.0f} bytes"
                f"{' plus int8 staging' if self.num_staging_slots else ''}); raise it", field="kv_cache_memory")
        limit = min(config.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
        if num_blocks * bs < limit:
            log.warning("KV pool holds %d tokens, less than the context of %d: max_model_len capped",
                        num_blocks * bs, limit)
        # A request that fits max_model_len can always finish alone in the pool.
        self.max_model_len = min(limit, num_blocks * bs)
        self.num_blocks = num_blocks

    def _windowed_layout(self, plain_blocks: int) -> LayerGroups | None:
        """Layer groups when sliding-window KV is released (kv/window_pages.py), else None, and why in the log.
        Released KV pays off once a request outgrows the window; the longest context that fits alone decides."""
        config, shape = self.config, self.model.shape
        groups = LayerGroups.of(shape)
        self.window_kv_why = None
        if groups is None:
            return None
        if not config.window_kv_release:
            self.window_kv_why = "turned off (--no-window-kv-release)"
        elif config.kv_cache_dtype == "int8":
            self.window_kv_why = "not with --kv-cache-dtype int8 (float pools only)"
        else:
            pages = config.kv_cache_memory // groups.page_bytes(shape, pool_dtype(config.kv_cache_dtype, self.dtype),
                                                                config.block_size)
            longest = groups.longest_context(pages, shape.sliding_window, config.block_size)
            if longest > 0 and longest >= plain_blocks * config.block_size:
                log.info("sliding-window KV released behind the window: pages of %d layers, %d sliding groups",
                         groups.size, groups.num_sliding_groups)
                return groups
            self.window_kv_why = (f"the pool of {config.kv_cache_memory} bytes is too small for it to pay: "
                                  "each request's window pages would outweigh the blocks released")
        log.info("sliding-window layers keep their KV for the whole context: %s", self.window_kv_why)
        return None

    def _build_scheduler_and_runner(self) -> None:
        config, bs = self.config, self.config.block_size
        self.pool = BlockPool(self.num_blocks)
        salt = (config.dtype, config.quantization, config.kv_cache_dtype)
        self.prefix_cache = PrefixCache(self.pool, bs, salt=salt) if config.enable_prefix_caching else None
        self.engine_salt = salt
        self.sessions = SessionStore(self.pool, bs, config.session_kv_fraction, config.session_ttl)
        self.window_pages = (None if self.layer_groups is None else
                             WindowPages(self.pool, bs, self.model.shape.sliding_window,
                                         self.layer_groups.num_sliding_groups))
        self.scheduler = Scheduler(self.pool, bs, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.prefix_cache, self.sessions, window=self.window_pages)
        self.runner = ModelRunner(self.model, self.num_blocks, bs, self.dtype, kv_cache_dtype=config.kv_cache_dtype,
                                  num_staging_slots=self.num_staging_slots, use_kernels=config.native_kernels,
                                  window_pages=self.window_pages)
        self.pool.on_release = self.runner.kv.release

    def _lora_manager(self) -> LoraManager | None:
        config = self.config
        if not (config.enable_lora or config.lora_modules or config.enable_fine_tuning):
            return None
        if has_experts(self.model):   # the slot tables cover the dense MLP's gate_up and down only
            raise KvloomError("LoRA adapters on mixture-of-experts models are not supported yet")
        manager = LoraManager(self.model, config.max_loras, config.max_lora_rank)
        self.scheduler.lora = self.runner.lora = manager
        for name, path in config.lora_modules:
            manager.load(name, path)
        return manager

    def _measure_speculation(self) -> LookaheadSpeculator:
        config = self.config
        cost = StepCost.measure(self.runner, self.pool, config.block_size, config.max_num_batched_tokens)
        log.info("speculation: forward pass of %s tokens takes %s ms (plain decodes only: %s), +%.1f ms per "
                 "extra chunk, +%.2f us per row and context token", cost.sizes,
                 [round(t * 1e3, 1) for t in cost.seconds], [round(t * 1e3, 1) for t in cost.decode_seconds],
                 cost.per_chunk * 1e3, cost.per_context_token * 1e6)
        native = kernels() if config.native_kernels else None   # its tries in C++ when the kernels are on
        return LookaheadSpeculator(SpecSettings(max_tokens=config.spec_max_tokens, branches=config.spec_branches), cost,
                                   native)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    session_id: str | None = None, cache_salt: str | None = None, priority: int = 0,
                    lora: str | None = None) -> str:
        """Queue a request; returns its id. Bad input raises a typed error and changes nothing.

        With params.n > 1 the n samples share the prompt's KV; their outputs carry this id as
        parent_id and their own index. cache_salt (a tenant's) keeps its prefix-cache blocks apart
        from everyone with another salt. lora: a loaded adapter's name (None: the base model); its
        prefix-cache blocks are its own too.
        """
        salt = self.prefix_salt(cache_salt, lora)       # checks the adapter first: a bad name changes nothing
        params = params or SamplingParams()
        if not params.greedy and params.seed is None:   # every sampled request has a seed (engine/rng.py)
            params = dataclasses.replace(params, seed=self._seeds.getrandbits(63))
        request_id = request_id or uuid.uuid4().hex
        self._check_new_id(request_id)
        prompt_ids = self._prompt_ids(prompt)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model serves at most {self.max_model_len} "
                f"tokens including at least one generated token")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = arrival_time or time.time()
        samples = []
        for k in range(params.n):
            req = Request(request_id if k == 0 else f"{request_id}#{k}", prompt_ids, _nth_sample(params, k),
                          max_tokens, arrival, None, request_id, k, session_id, salt, priority)
            req.lora_name = lora
            req.generator = self._generator(req.params)
            self._states[req.request_id] = OutputState(req, self.tokenizer)
            samples.append(req)
        grammar = self._grammar_future(params)
        self._register_family(request_id, samples, cache_salt)
        if len(samples) > 1:
            # Samples 1..n-1 fork from sample 0 once its prompt is computed: the prompt's KV is shared.
            self._pending_forks[request_id] = samples[1:]
        if grammar is not None and not grammar.done():
            self._awaiting_grammar[request_id] = (grammar, samples)   # queued when it compiles (step())
        else:
            self._attach_matchers(samples, grammar)
            self.scheduler.add(samples[0])
        return request_id

    # ---- structured outputs (kvloom/structured) --------------------------------------------

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer.hf, self.model.shape.vocab_size,
                                             self.tokenizer.eos_token_ids)
        return self._grammars

    def _grammar_future(self, params: SamplingParams):
        """The compiling grammar of a constrained request (None for others). A constraint the library
        rejects raises here, before anything changes (the server has checked it already: then it is cached)."""
        spec = params.structured_outputs
        if spec is None:
            return None
        validate_constraint(spec)
        return self.grammars.submit(spec)

    def _attach_matchers(self, samples: list[Request], grammar) -> None:
        """Each sample its own matcher (n > 1 samples diverge); it follows the sample's tokens from zero."""
        if grammar is None:
            return
        proto = grammar.result()
        for req in samples:
            req.matcher = RequestMatcher(proto, self.grammars.vocab_size,
                                         self.tokenizer.eos_token_ids if req.params.ignore_eos else ())

    def _admit_compiled(self, wait: float = 0.0) -> list[RequestOutput]:
        """Queue the requests whose grammar is ready; with wait, first wait that long for one when none is."""
        if wait and not any(f.done() for f, _ in self._awaiting_grammar.values()):
            concurrent.futures.wait([f for f, _ in self._awaiting_grammar.values()], timeout=wait,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for rid, (fut, samples) in list(self._awaiting_grammar.items()):
            if not fut.done():
                continue
            del self._awaiting_grammar[rid]
            if fut.exception() is not None:   # cannot happen after validate(); the request ends, never hangs
                log.error("grammar of request %s failed to compile: %s", rid, fut.exception())
                failed.extend(self._fail_family(rid, samples, f"its grammar failed to compile: {fut.exception()}"))
                self.abort_request(rid)
                continue
            self._attach_matchers(samples, fut)
            self.scheduler.add(samples[0])
        return failed

    def _fail_family(self, rid: str, samples: list[Request], why: str) -> list[RequestOutput]:
        """Final outputs (finish_reason "error") for the samples of a request that cannot go on. The caller
        frees whatever they hold: abort_request for requests the scheduler has seen."""
        outs = []
        for req in samples:
            if self._states.get(req.request_id) is not None:
                outs.append(RequestOutput(request_id=req.request_id, parent_id=rid, index=req.index,
                                          num_cached_tokens=0, prompt_token_ids=req.prompt_token_ids,
                                          delta_text="", delta_token_ids=[], delta_logprobs=None, text="",
                                          token_ids=[], logprobs=None, finished=True, finish_reason="error",
                                          stop_reason=None, metrics={}, error=why))
        return outs

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._family:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", field="request_id")

    def _register_family(self, request_id: str, samples: list[Request], cache_salt: str | None) -> None:
        self._family[request_id] = [r.request_id for r in samples]
        self._tenant_salt[request_id] = cache_salt

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        # Seeded before each draw from (params.seed, position): engine/rng.py.
        return None if params.greedy else torch.Generator()

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
        self._awaiting_grammar.pop(request_id, None)
        self._tenant_salt.pop(request_id, None)
        self._pending_forks.pop(request_id, None)
        for rid in family:
            self._states.pop(rid, None)
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
        return True

    # ---- one sample of a family (inference-time scaling: kvloom/scaling) --------------------------

    def abort_sample(self, sample_id: str) -> RequestOutput | None:
        """End one sample of an n-family now (finish_reason "abort"), freeing the blocks only it holds; the
        family's other samples go on. Returns its final output, None for an unknown or finished sample."""
        state = self._states.get(sample_id)
        if state is None:
            return None
        req, parent = state.req, state.req.parent_id
        pending = self._pending_forks.get(parent, [])
        awaiting = self._awaiting_grammar.get(parent)
        if awaiting is not None:            # not queued yet (its grammar compiles): drop it from the list
            awaiting[1].remove(req)
            if req in pending:
                pending.remove(req)
            elif pending:                   # it was the head: the next sample is, and forks no more
                pending.pop(0)
        elif req in pending:
            pending.remove(req)
        else:
            self.scheduler.finish(sample_id, RequestStatus.FINISHED_ABORTED)
            if pending:   # it was the head, its prompt not done: the next sample computes it (prefix cache helps)
                self.scheduler.add(pending.pop(0), front=True)
        if not pending:
            self._pending_forks.pop(parent, None)
        if awaiting is not None and not awaiting[1]:
            del self._awaiting_grammar[parent]
        state.finish_reason = "abort"
        return self._output(req, state, time.time())

    def fork_sample(self, sample_id: str, seed: int | None = None) -> str:
        """A new sample of the family that continues from where sample_id stands, sharing all its blocks
        (copy-on-write); it draws with `seed` (default: its own index's). Returns the new sample's id. A
        running source's fork runs at once, even past max_num_seqs (guided search aborts before it forks);
        any other waits at the head of the queue."""
        state = self._states.get(sample_id)
        src = None if state is None else self.scheduler.requests.get(sample_id)
        if src is None or src.matcher is not None:
            raise InvalidRequestError(f"sample {sample_id!r} is not a queued or running unconstrained sample",
                                      field="request_id")
        family = self._family[src.parent_id]
        index = len(family)     # every index below it is taken (the family's list keeps finished samples)
        params = src.params if src.params.greedy else dataclasses.replace(
            src.params, seed=src.params.seed + index if seed is None else seed)
        child = Request(f"{src.parent_id}#{index}", src.prompt_token_ids, params, src.max_tokens, src.arrival_time,
                        None, src.parent_id, index, src.session_id, src.cache_salt, src.priority)
        child.lora_name = src.lora_name
        child.generator = self._generator(params)
        for t in src.output_token_ids:
            child.append_output(t)
        child_state = OutputState(child, self.tokenizer)
        child_state.restore(state.export())
        child_state.emitted_chars = child_state.emitted_tokens = 0   # its own stream starts at the beginning
        self._states[child.request_id] = child_state
        family.append(child.request_id)
        running = src.status == RequestStatus.RUNNING and src.num_uncomputed == 1
        self.scheduler.fork(src, child, running=running, computed=src.num_computed_tokens)
        return child.request_id

    def set_last_token(self, sample_id: str, token_id: int) -> None:
        """Replace a sample's last output token, drawn but not yet computed (beam search picks another
        continuation than the one drawn); its text state is rebuilt from its tokens."""
        state = self._states.get(sample_id)
        req = None if state is None else self.scheduler.requests.get(sample_id)
        if req is None or not req.output_token_ids or req.num_uncomputed < 1 or req.matcher is not None:
            raise InvalidRequestError(f"sample {sample_id!r} has no drawn, uncomputed token to replace",
                                      field="request_id")
        if not 0 <= token_id < self.model.shape.vocab_size or token_id in state.eos_ids | state.stop_ids:
            raise InvalidRequestError(f"token id {token_id} is outside the vocabulary or would end the sample "
                                      "(abort it instead)", field="token_id")
        req.output_token_ids[-1] = req.all_token_ids[-1] = token_id
        rebuilt = OutputState(req, self.tokenizer)
        old = state.logprobs or []
        for i, t in enumerate(req.output_token_ids):
            lp = old[i] if i < len(old) else None
            if lp is not None and i == len(req.output_token_ids) - 1:   # the new token's, from the same draw's top
                lp = TokenLogprobs(t, dict(lp.top).get(t, float("nan")), lp.top)
            rebuilt.add_token(t, lp)
        rebuilt.emitted_chars = min(state.emitted_chars, len(rebuilt.text))
        rebuilt.emitted_tokens = len(req.output_token_ids) - 1
        self._states[sample_id] = rebuilt

    def pause_sample(self, sample_id: str) -> None:
        """Keep a queued or running sample out of the steps until unpause_sample: a search holds the samples
        that have reached the end of a round while the others catch up or are graded. It keeps its seat and
        blocks, but gives them up first when anyone lacks room (preempted, it recomputes once unpaused)."""
        req = self.scheduler.requests.get(sample_id)
        if req is None:
            raise InvalidRequestError(f"sample {sample_id!r} is not a queued or running sample", field="request_id")
        req.paused = True

    def unpause_sample(self, sample_id: str) -> None:
        """Let a paused sample run again (a no-op for an unknown or finished one)."""
        req = self.scheduler.requests.get(sample_id)
        if req is not None:
            req.paused = False

    def close_session(self, session_id: str) -> bool:
        """Release an agent session's retained KV now. False when the session holds nothing."""
        return self.sessions.release(session_id)

    # ---- LoRA adapters (kvloom/lora) -----------------------------------------------------------

    def prefix_salt(self, cache_salt: str | None, lora: str | None) -> bytes:
        """The prefix-cache salt of a request: this engine's modes, the tenant's salt, the adapter's load."""
        return salt_bytes(self.engine_salt, cache_salt, self._lora_key(lora))

    def _lora_key(self, name: str | None) -> bytes | None:
        """The adapter's prefix-cache salt part (one per load: a reloaded name never hits the old KV)."""
        if name is None:
            return None
        if self.lora is None:
            raise InvalidRequestError("this engine serves no LoRA adapters (start it with lora_modules or "
                                      "enable_lora)", field="lora")
        if name not in self.lora.adapters:
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded", field="lora")
        return self.lora.keys[name]

    def load_lora(self, name: str, path: str) -> None:
        self.add_lora(self.read_lora(name, path))

    def read_lora(self, name: str, path: str) -> LoraAdapter:
        """Read and check an adapter directory; safe off the engine's thread (it changes nothing)."""
        if self.lora is None:
            raise InvalidRequestError("LoRA is not enabled on this engine (enable_lora)", field="lora_name")
        return self.lora.read(name, path)

    def add_lora(self, adapter: LoraAdapter) -> None:
        self.lora.add(adapter)

    def unload_lora(self, name: str) -> None:
        """Refused while requests of that adapter are queued or running: theirs would change mid-output."""
        if self.lora is None:
            raise InvalidRequestError("LoRA is not enabled on this engine (enable_lora)", field="lora_name")
        in_use = any(r.lora_name == name for r in self.scheduler.requests.values()) or any(
            r.lora_name == name for _, samples in self._awaiting_grammar.values() for r in samples) or any(
            r.lora_name == name for pending in self._pending_forks.values() for r in pending)
        self.lora.unload(name, in_use)

    # ---- moving requests (engine/snapshot.py) -------------------------------------------------

    def export_request(self, request_id: str, with_kv: bool = True) -> RequestSnapshot:
        """Take a request, with every unfinished sample of its family, out of this engine as a snapshot that
        another engine continues with import_request. With with_kv, the computed KV blocks go along."""
        family = self._family.get(request_id)
        if family is None:
            raise InvalidRequestError(f"no unfinished request {request_id!r} here", field="request_id")
        if request_id in self._awaiting_grammar:   # not queued yet: let its grammar finish first
            fut, samples = self._awaiting_grammar.pop(request_id)
            self._attach_matchers(samples, fut)
            self.scheduler.add(samples[0])
        pending = {r.request_id: r for r in self._pending_forks.get(request_id, ())}
        members = [self.scheduler.requests.get(rid) or pending[rid] for rid in family if rid in self._states]
        bs = self.config.block_size
        index: dict[int, int] = {}      # block id -> position in the snapshot's blocks (forks share blocks)
        tables = []
        for req in members:
            blocks = req.block_ids[:-(-req.num_computed_tokens // bs)] if with_kv else []
            tables.append([index.setdefault(b, len(index)) for b in blocks])
        kv = None
        if index:
            kv = KVBlocks(dict(self.runner.kv.layout), self.runner.kv.read_blocks(self._kv_tables(list(index))),
                          len(index))
        samples = [SampleSnapshot(
            request_id=req.request_id, index=req.index, params=req.params, max_tokens=req.max_tokens,
            output_token_ids=list(req.output_token_ids),
            num_computed_tokens=req.num_computed_tokens if table else 0,
            generator_state=None if req.generator is None else req.generator.get_state(),
            output_state=self._states[req.request_id].export(), block_table=table,
            num_cached_tokens=req.num_cached_tokens, num_preemptions=req.num_preemptions,
            first_scheduled_time=req.first_scheduled_time, forked=req.request_id not in pending,
            speculation=None if self.speculator is None else self.speculator.export_state(req))
            for req, table in zip(members, tables)]
        first = members[0]
        snap = RequestSnapshot(request_id, first.prompt_token_ids, first.arrival_time, samples, first.session_id,
                               first.priority, self._tenant_salt.get(request_id), kv, lora_name=first.lora_name)
        for req in members:
            if req.request_id not in pending:
                self.scheduler.detach(req.request_id)
            del self._states[req.request_id]
        del self._family[request_id]
        self._tenant_salt.pop(request_id, None)
        self._pending_forks.pop(request_id, None)
        return snap

    def import_request(self, snap: RequestSnapshot) -> str:
        """Continue a request exported from another engine (or this one). Its samples wait at the head of the
        queue; with KV they resume where they stood, without it they recompute their tokens first.

        Raises InvalidRequestError (and changes nothing) when the id is taken, the KV's layout differs from
        this engine's, or the pool has too few free blocks for the KV (import snap.without_kv() then)."""
        self._check_new_id(snap.request_id)
        salt = self.prefix_salt(snap.cache_salt, snap.lora_name)   # checks the adapter before anything changes
        prompt_ids = self._prompt_ids(snap.prompt_token_ids)
        grammar = self._grammar_future(snap.samples[0].params) if snap.samples else None
        for s in snap.samples:
            if len(prompt_ids) + s.max_tokens > self.max_model_len:
                raise PromptTooLongError(f"request {snap.request_id!r} needs {len(prompt_ids) + s.max_tokens} "
                                         f"tokens of context; this engine serves {self.max_model_len}")
        blocks, window_held = self._import_kv(snap) if snap.kv is not None else ([], [])
        used = [False] * len(blocks)
        samples: list[Request] = []
        for s in snap.samples:
            req = Request(s.request_id, prompt_ids, s.params, s.max_tokens, snap.arrival_time, None,
                          snap.request_id, s.index, snap.session_id, salt, snap.priority)
            req.lora_name = snap.lora_name
            if s.generator_state is not None:
                req.generator = torch.Generator()
                req.generator.set_state(s.generator_state)
            for t in s.output_token_ids:
                req.append_output(t)
            req.num_cached_tokens, req.num_preemptions = s.num_cached_tokens, s.num_preemptions
            req.first_scheduled_time = s.first_scheduled_time
            for i in s.block_table:
                if used[i]:
                    self.pool.share(blocks[i])
                used[i] = True
            req.block_ids = [blocks[i] for i in s.block_table]
            req.num_computed_tokens = s.num_computed_tokens if s.block_table else 0
            state = self._states[req.request_id] = OutputState(req, self.tokenizer)
            state.restore(s.output_state)
            if self.speculator is not None:
                self.speculator.import_state(req, s.speculation)
            samples.append(req)
        for req in samples:
            self.scheduler.hold_window(req)
        for b in window_held:                   # the samples hold what they read now
            self.window_pages.drop(b)
        self.pool.free([b for b, u in zip(blocks, used) if not u])
        # The grammar state is rebuilt from the tokens: each matcher replays its sample's output at its next draw.
        self._attach_matchers(samples, grammar)
        self._register_family(snap.request_id, samples, snap.cache_salt)
        waiting = [r for r, s in zip(samples, snap.samples) if not s.forked]
        if waiting:
            self._pending_forks[snap.request_id] = waiting
        for req in reversed([r for r, s in zip(samples, snap.samples) if s.forked]):
            self.scheduler.add(req, front=True)   # it ran before: it goes ahead of requests that never did
        return snap.request_id

    def _import_kv(self, snap: RequestSnapshot) -> tuple[list[int], list[int]]:
        """Blocks holding the snapshot's KV, and those given sliding pages (held once each, for the caller
        to hand over to the samples)."""
        kv = snap.kv
        if kv.layout != self.runner.kv.layout:
            raise InvalidRequestError(f"the snapshot's KV ({kv.layout}) does not fit this engine's KV pool "
                                      f"({self.runner.kv.layout}); import it without KV", field="kv")
        window: set[int] = set()       # snapshot blocks some sample's sliding layers still read
        if self.window_pages is not None:
            for s in snap.samples:
                if s.block_table:
                    window.update(s.block_table[self.window_pages.first_needed(s.num_computed_tokens):])
        pages = kv.num_blocks + len(window) * (self.scheduler.pages_per_block - 1)
        while self.pool.num_free < pages and self.sessions.release_oldest():
            pass
        if self.pool.num_free < pages:
            raise InvalidRequestError(f"the snapshot's KV ({pages} pages) does not fit the {self.pool.num_free} "
                                      "free ones; import it without KV", field="kv")
        blocks = self.pool.allocate(kv.num_blocks)
        held = [blocks[i] for i in sorted(window)]
        for b in held:
            self.window_pages.hold(b, fresh=True)
        self.runner.kv.write_blocks(self._kv_tables(blocks), kv.tensors)
        return blocks, held

    def _kv_tables(self, blocks: list[int]):
        """What the KV pool's block I/O names: the blocks, or with sliding-window pages, per layer group the
        page of each block (group 0's is the block itself)."""
        if self.window_pages is None:
            return blocks
        return [blocks] + [list(g) for g in zip(*(self.window_pages.pages_of(b) for b in blocks))]

    def resume_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       outputs: dict[int, tuple[list[int], list | None]], arrival_time: float | None = None,
                       session_id: str | None = None, cache_salt: str | None = None, priority: int = 0,
                       lora: str | None = None) -> str:
        """Continue a request from nothing but the tokens its samples have streamed (the engine that ran it
        is gone): outputs maps each unfinished sample's index to (its output token ids, their logprobs or
        None). Every sample recomputes its tokens; the prefix cache shares their prompt. The text state is
        replayed, so the next delta starts where the stream stopped, and the position-keyed RNG
        (engine/rng.py) draws what the lost engine would have: the same tokens, greedy or seeded."""
        if not params.greedy and params.seed is None:
            raise InvalidRequestError("a sampled request resumes only with its seed", field="seed")
        salt = self.prefix_salt(cache_salt, lora)
        self._check_new_id(request_id)
        prompt_ids = self._prompt_ids(prompt)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if room < 1:
            raise PromptTooLongError(f"request {request_id!r}'s prompt does not fit this engine's context")
        samples = []
        for k, (tokens, logprobs) in sorted(outputs.items()):
            req = Request(request_id if k == 0 else f"{request_id}#{k}", prompt_ids, _nth_sample(params, k),
                          max_tokens, arrival_time or time.time(), None, request_id, k, session_id, salt, priority)
            req.lora_name = lora
            req.generator = self._generator(req.params)
            state = OutputState(req, self.tokenizer)
            for i, t in enumerate(tokens):
                req.append_output(t)
                state.add_token(t, None if logprobs is None else logprobs[i])
            state.take_delta()        # all of it reached the client already
            self._states[req.request_id] = state
            samples.append(req)
        if not samples:
            raise InvalidRequestError(f"request {request_id!r} has no unfinished sample to resume", field="outputs")
        self._attach_matchers(samples, self._grammar_future(params))
        self._register_family(request_id, samples, cache_salt)
        for req in reversed(samples):
            self.scheduler.add(req, front=True)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_grammar)

    # ---- the step loop ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """schedule -> execute (the runner samples) -> update (tokens, forks, text, stops).

        An exception inside the step ends the requests of that step, each with finish_reason "error" and its
        blocks freed; every other request goes on as if nothing happened."""
        started = time.perf_counter()   # the whole step's time is what speculation's guard compares
        if self._last_step is not None:
            self._observe_pace(started)
        failed = self._admit_compiled() if self._awaiting_grammar else []
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self._awaiting_grammar and not failed:   # only grammars compiling: wait for one, briefly
                failed = self._admit_compiled(wait=0.005)
            return failed
        parents = list(dict.fromkeys(self.scheduler.requests[c.request_id].parent_id for c in plan.chunks))
        if self.faults is not None:
            self.faults.begin_step([c.request_id for c in plan.chunks])
        try:
            return failed + self._execute(plan, started)
        except Exception as e:
            log.exception("a step failed; ending its %d requests", len(parents))
            why = f"internal error in the engine step that ran this request ({type(e).__name__}: {e})"
            return failed + [out for p in parents for out in self._end_with_error(p, why)]

    def _execute(self, plan, started: float) -> list[RequestOutput]:
        samplers, forks = self._samplers(plan)
        result = self.runner.execute(plan, samplers, self.faults)
        self._observe_drafts(plan, result)
        self.scheduler.update(plan, result.token_ids, result.kept_drafts)
        for parent, child, now_running in forks:
            self.scheduler.fork(parent, child, running=now_running)
            if now_running:
                child.append_output(result.token_ids[child.request_id][0])
        if self.faults is not None:
            self.faults.fire("detokenizer")
        broken = {self.scheduler.requests[rid].parent_id: why for rid, why in result.failed.items()}
        for rid in result.token_ids:    # a grammar that can no longer constrain its output ends the request
            matcher = self.scheduler.requests[rid].matcher
            if matcher is not None and matcher.error is not None:
                broken[self.scheduler.requests[rid].parent_id] = f"the output constraint failed: {matcher.error}"
        now = time.time()
        outputs = [out for parent, why in broken.items() for out in self._end_with_error(parent, why)]
        for rid, tokens in result.token_ids.items():
            if rid not in self._states:   # its request has just ended with an error
                continue
            req = self.scheduler.requests[rid]
            state = self._states[rid]
            for used, (token, lp) in enumerate(zip(tokens, result.logprobs[rid]), 1):
                state.add_token(token, lp)
                if state.finish_reason is not None:
                    req.truncate_output(len(req.output_token_ids) - (len(tokens) - used))
                    break
            outputs.append(self._output(req, state, now))
        if self.speculator is not None:   # after the outputs: a drafted step's extra tokens cost text too
            self.speculator.record_step(plan, result.token_ids, time.perf_counter() - started)
        if self.tpot is not None:
            self._last_step = (tuple(c.request_id for c in plan.decodes), plan.num_tokens - len(plan.decodes), started,
                               time.perf_counter())
        return outputs

    def _observe_pace(self, now: float) -> None:
        """The step before, from its start to this one's: what a request decoding in it waited for its token.
        A gap longer than the step itself is not the loop's work between steps (the engine idled, or a
        fine-tuning slice ran): then the step's own time."""
        decodes, prompt_tokens, start, end = self._last_step
        self._last_step = None
        between = now - end < end - start and not (self.trainer is not None and self.trainer.active)
        self.tpot.observe(len(decodes), prompt_tokens, (now if between else end) - start, paced=bool(decodes),
                          decoded=decodes)

    def _end_with_error(self, parent: str, why: str) -> list[RequestOutput]:
        """End every sample of a request with finish_reason "error" and free its blocks."""
        samples = [self.scheduler.requests.get(rid) for rid in self._family.get(parent, ())]
        samples = [r for r in samples if r is not None] + self._pending_forks.get(parent, [])
        outs = self._fail_family(parent, samples, why)
        self.abort_request(parent)
        return outs

    def _samplers(self, plan) -> tuple[dict[str, list[Request]], list[tuple[Request, Request, bool]]]:
        """Who draws from each sampled chunk's last row: its request, and the samples that fork from it now.

        Samples 1..n-1 fork when sample 0's prompt is computed, as far as max_num_seqs allows; the rest wait
        at the head of the queue sharing the prompt's blocks (they draw their first token when admitted)."""
        samplers: dict[str, list[Request]] = {}
        forks: list[tuple[Request, Request, bool]] = []   # (parent, child, joins the running batch now)
        room = self.scheduler.max_num_seqs - len(self.scheduler.running)
        for c in plan.chunks:
            if not c.sample:
                continue
            req = self.scheduler.requests[c.request_id]
            samplers[c.request_id] = [req]
            # (keyed by the family: the sample they fork from is sample 0, or the next one if 0 was aborted)
            pending = self._pending_forks.pop(req.parent_id, None)
            if pending:
                fit = max(0, min(room, len(pending)))
                room -= fit
                samplers[c.request_id] += pending[:fit]
                forks += [(req, child, k < fit) for k, child in enumerate(pending)]
        return samplers, forks

    def _observe_drafts(self, plan, result) -> None:
        if not result.draft_paths:
            return
        for c in plan.spans:
            path = result.draft_paths.get(c.request_id)
            if path is not None:
                tree = DraftTree(c.token_ids[-c.num_draft_tokens:], c.draft_parents)
                self.speculator.observe(self.scheduler.requests[c.request_id], tree, path)

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
                del self._tenant_salt[req.parent_id]
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
            cumulative_logprob=None if state.logprobs is None else state.cumulative_logprob,
        )


def _nth_sample(params: SamplingParams, k: int) -> SamplingParams:
    """The k-th of n samples: n=1, and its own seed (seed + k) so the n differ but stay reproducible."""
    if params.n == 1:
        return params
    return dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + k)
