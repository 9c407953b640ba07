"""Executes a SchedulerOutput: builds the flat batch, runs the model, samples, returns tokens.

Owns the model and the physical KV tensors. The forward pass knows block ids, never
requests; sampling reads the requests' settings and generators (`samplers`).
"""
from __future__ import annotations

import torch

from kvloom.engine.faults import FaultPlan
from kvloom.engine.request import Request
from kvloom.engine.runner_output import ModelRunnerOutput
from kvloom.engine.rng import reseed
from kvloom.engine.sampler import sample
from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.kernels import kernels
from kvloom.kv.int8_kv_cache import Int8KVCache
from kvloom.kv.kv_cache import allocate_kv_cache, pool_dtype
from kvloom.kv.windowed_kv_cache import LayerGroups, WindowedKVCache, remap_metadata
from kvloom.attention.backend import DecodeStackAttention, NativeAttention, TorchAttention
from kvloom.models.decode_stack import build_decode_stack
from kvloom.models.llama import LlamaForCausalLM
from kvloom.speculation.ngram_trie import DraftTree
from kvloom.speculation.tree_attention import tree_depths
from kvloom.speculation.verify import verify
from kvloom.structured.matcher import mask_draft_tree, masks_during_forward


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_dtype: str = "auto", num_staging_slots: int = 0,
                 use_kernels: bool = True, window_pages=None):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        # The native decode kernel reads float32 or float16 pools (or int8 ones with float32 scales) on the CPU.
        self.native_decode = (use_kernels and dtype == torch.float32 and self.device.type == "cpu"
                              and kernels() is not None)
        # The sampler's native draws and argmax (kernels/sampler_draw.cpp) work on any dtype: logits are float32.
        self.native_sampler = use_kernels and kernels() is not None
        # Sliding-window layers (Gemma 3): the native kernels and the decode stack have no window, so the
        # torch backend runs every step (said in /server_info, never silently).
        self.sliding_window = getattr(model.shape, "sliding_window", None)
        # The native kernel takes a window over a float pool; the int8 pool's has none.
        sliding_blocks_native = (self.native_decode and self.sliding_window is not None
                                 and kv_cache_dtype == "int8")
        # window_pages (kv/window_pages.py): the sliding layers' KV lives in pages of their own, released
        # behind each request's window; then num_blocks counts pages of a group of layers.
        self.window_pages = window_pages
        if window_pages is not None:
            groups = LayerGroups.of(model.shape)
            self.kv = WindowedKVCache(num_blocks, model.shape, block_size, dtype, self.device, groups,
                                      pool_dtype(kv_cache_dtype, dtype))
            for layer, group in zip(model.layers, groups.group_of):
                layer.self_attn.kv_group = group
        else:
            self.kv = allocate_kv_cache(kv_cache_dtype, num_blocks, block_size=block_size, shape=model.shape,
                                        dtype=dtype, device=self.device, num_staging_slots=num_staging_slots)
        # Attention backends (kvloom/attention/backend.py): the decode stack first where it applies, else the
        # per-layer one. Why one is missing is kept for /server_info.
        if self.native_decode and not sliding_blocks_native:
            self.per_layer = NativeAttention(block_size, model.shape.num_kv_heads, dtype, self.device,
                                             prefix_rows=kv_cache_dtype != "int8", sliding_window=self.sliding_window)
        else:
            self.per_layer = TorchAttention(block_size, model.shape.num_kv_heads, dtype, self.device,
                                            self.sliding_window)
        self.decode_stack: DecodeStackAttention | None = None
        self.lora = None          # a LoraManager, set before enable_decode_stack when adapters are served
        self.why_not = {}
        if not self.native_decode:
            self.why_not["native"] = ("turned off (--no-native-kernels)" if not use_kernels
                                      else f"the native kernels read float32 pools on the CPU ({dtype}, {self.device})")
        elif sliding_blocks_native:
            self.why_not["native"] = (f"{type(model).__name__} has sliding-window layers (window "
                                      f"{self.sliding_window}); the native int8-pool attention kernel has no window")
        if self.native_decode:
            model.use_native_ops()

    def enable_decode_stack(self) -> None:
        """Run steps of decodes (and short draft trees) through the native layer stack; call once the weights
        are final."""
        if not self.native_decode:
            self.why_not["decode-stack"] = "needs the native kernels"
            return
        if self.sliding_window is not None:
            self.why_not["decode-stack"] = (f"{type(self.model).__name__} has sliding-window layers; the decode "
                                            "stack runs Llama-family layers without a window")
            return
        stack, why = build_decode_stack(self.model, self.kv)
        if stack is None:
            self.why_not["decode-stack"] = why
        else:
            int8_kv = self.kv if isinstance(self.kv, Int8KVCache) else None
            self.decode_stack = DecodeStackAttention(stack, self.block_size, self.device, int8_kv)
            if self.lora is not None:
                stack.set_lora(self.lora.tables.for_stack())

    def describe_backends(self) -> dict:
        """Which attention backends run steps here, and for each that does not, why."""
        active = ([self.decode_stack.name] if self.decode_stack is not None else []) + [self.per_layer.name]
        return {"attention_backends": active, "inactive_backends": dict(self.why_not)}

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, samplers: dict[str, list[Request]],
                faults: FaultPlan | None = None) -> ModelRunnerOutput:
        """Run the step and sample. samplers: for each chunk with sample=True, the requests that draw from its
        last row: its own, then any samples forked from it this step (they share the prompt's logits).
        faults: injected ones, in tests only (engine/faults.py)."""
        masks = masks_during_forward(plan, samplers)   # constrained rows' grammar masks, while the model runs
        logits = self.logits(plan)
        if faults is not None:
            faults.fire("runner")     # after the forward pass has written KV: the hardest place to fail
            _poison(logits, plan, faults)
        return self.sample(plan, logits, samplers, masks, faults)

    @torch.inference_mode()
    def logits(self, plan: SchedulerOutput, all_logits: bool = False) -> torch.Tensor:
        """Logits of the chunks with sample=True, in plan.chunks order: one row each, or 1 + num_draft_tokens
        rows for a chunk carrying drafts (its last committed token, then each draft token).
        With all_logits: one row for every token of the batch, for evaluation."""
        if plan.copies:
            self.kv.copy_blocks(plan.copies)   # copy-on-write, before this step writes into the copies
        input_ids, positions, meta, logits_indices = self._prepare(plan)
        to_seal = self.kv.prepare(plan.chunks, meta)
        if all_logits:
            logits_indices = torch.arange(len(input_ids), device=self.device)
        logits = self.model(input_ids, positions, meta, self.kv.layers, logits_indices)
        self.kv.seal(to_seal)
        return logits

    def sample(self, plan: SchedulerOutput, logits: torch.Tensor,
               samplers: dict[str, list[Request]], masks=None, faults: FaultPlan | None = None) -> ModelRunnerOutput:
        """Next tokens: drawn by the sampler (one batched call for the plain rows), or accepted by verifying a
        chunk's draft tree. A chunk whose logits are not finite samples nothing: it is reported in out.failed."""
        out = ModelRunnerOutput()
        if faults is not None:
            faults.fire("sampler")
        logits = self._drop_non_finite(plan, logits, out)
        rows: list[int] = []
        reqs: list[Request] = []
        row = 0
        for c in plan.chunks:
            if not c.sample:
                continue
            owner, *forks = samplers[c.request_id]
            out.token_ids[c.request_id] = []    # keeps plan order
            k = c.num_draft_tokens
            for req in (owner, *forks):
                reseed(req)
            if k:
                rows_k = logits[row:row + 1 + k]
                if owner.matcher is not None:   # drafts are checked against the grammar: refused ones never pass
                    owner.matcher.sync(owner.output_token_ids)
                    rows_k = mask_draft_tree(rows_k, c.token_ids[-k:], c.draft_parents, owner.matcher)
                tokens, path = verify(rows_k, DraftTree(c.token_ids[-k:], c.draft_parents), owner)
                out.token_ids[c.request_id] = tokens
                out.logprobs[c.request_id] = [None] * len(tokens)
                out.draft_paths[c.request_id] = path
                out.kept_drafts[c.request_id] = next((j for j, i in enumerate(path) if i != j), len(path))
            else:
                rows.extend([row] * (1 + len(forks)))
                reqs.append(owner)
                reqs.extend(forks)
            row += 1 + k
        if reqs:
            picked = logits if rows == list(range(row)) else logits[torch.tensor(rows)]
            result = sample(picked, reqs, masks.result() if masks is not None else None, native=self.native_sampler)
            for req, token, lp in zip(reqs, result.token_ids, result.logprobs):
                out.token_ids[req.request_id] = [token]
                out.logprobs[req.request_id] = [lp]
        return out

    def _drop_non_finite(self, plan: SchedulerOutput, logits: torch.Tensor, out: ModelRunnerOutput) -> torch.Tensor:
        """Report chunks with a NaN or inf logit and give them zero rows, so the batch samples on.

        One sum a row finds them: any NaN or inf makes the sum non-finite, and real logits are far too small
        for a finite row to overflow it."""
        if logits.numel() == 0 or _all_finite(logits, self.native_sampler):
            return logits
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()
        row = 0
        for c in plan.chunks:
            if not c.sample:
                continue
            rows = 1 + c.num_draft_tokens
            if not all(finite[row:row + rows]):
                out.failed[c.request_id] = "the model produced non-finite logits (NaN or inf) for this request"
            row += rows
        logits = logits.clone()
        logits[~torch.isfinite(logits)] = 0.0
        return logits

    def _prepare(self, plan: SchedulerOutput):
        """The flat batch (decodes first, then spans), positions, the rows to take logits of, and the step's
        attention metadata from the first backend that supports the step."""
        ids: list[int] = []
        pos: list[int] = []
        logits_indices: list[int] = []
        for c in plan.decodes:
            ids.append(c.token_ids[0])
            pos.append(c.start_pos)
            logits_indices.append(len(ids) - 1)
        for c in plan.spans:
            n, start, k = len(c.token_ids), c.start_pos, c.num_draft_tokens
            ids.extend(c.token_ids)
            if k:
                committed = n - k
                pos.extend(range(start, start + committed))
                pos.extend(start + committed - 1 + d for d in tree_depths(c.draft_parents))
                if c.sample:   # the last committed token's row, then every draft token's
                    logits_indices.extend(range(len(ids) - k - 1, len(ids)))
            else:
                pos.extend(range(start, start + n))
                if c.sample:
                    logits_indices.append(len(ids) - 1)
        backend = self.decode_stack if self.decode_stack is not None and self.decode_stack.supports(plan) \
            else self.per_layer
        dev = self.device
        meta = backend.build(plan)
        if any(c.lora_slot >= 0 for c in plan.chunks):   # rows in flat-batch order: decodes, then spans' tokens
            slots = [c.lora_slot for c in plan.decodes] + [c.lora_slot for c in plan.spans for _ in c.token_ids]
            meta.lora_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        if self.window_pages is not None:
            lookup = self.window_pages.lookup
            meta.window_groups = [remap_metadata(meta, lookup[g]) for g in range(lookup.shape[0])]
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                meta, torch.tensor(logits_indices, dtype=torch.long, device=dev))


def _all_finite(logits: torch.Tensor, native: bool) -> bool:
    """The whole step's check: one native scan (native: the runner's kernels are on), or one sum (a NaN or inf
    makes it non-finite)."""
    if native and logits.dtype == torch.float32 and logits.is_contiguous():
        return kernels().all_finite(logits)
    return bool(torch.isfinite(logits.sum()).item())


def _poison(logits: torch.Tensor, plan: SchedulerOutput, faults: FaultPlan) -> None:
    """An injected nan fault: the chosen sampled chunk's logits rows become NaN."""
    sampled = [c for c in plan.chunks if c.sample]
    i = faults.poisoned_row([c.request_id for c in sampled])
    if i is not None:
        start = sum(1 + c.num_draft_tokens for c in sampled[:i])
        logits[start:start + 1 + sampled[i].num_draft_tokens] = float("nan")
