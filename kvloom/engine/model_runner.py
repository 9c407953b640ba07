"""Executes a SchedulerOutput: builds the flat batch, runs the model, samples, returns tokens.

Owns the model and the physical KV tensors. The forward pass knows block ids, never
requests; sampling reads the requests' settings and generators (`samplers`).
"""
from __future__ import annotations

import torch

from kvloom.engine.request import Request
from kvloom.engine.runner_output import ModelRunnerOutput
from kvloom.engine.sampler import sample
from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.kernels import kernels
from kvloom.kv.kv_cache import allocate_kv_cache
from kvloom.models.decode_stack import STACK_MAX_CHUNK, build_decode_stack
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.paged_attention import AttentionMetadata, PrefillChunk, head_block_rows
from kvloom.speculation.ngram_trie import DraftTree
from kvloom.speculation.tree_attention import tree_depths, tree_mask, tree_visibility_bits
from kvloom.speculation.verify import verify


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_dtype: str = "auto", num_staging_slots: int = 0,
                 use_kernels: bool = True):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        # The native decode kernel reads float32 pools (or int8 ones with float32 scales) on the CPU.
        self.native_decode = (use_kernels and dtype == torch.float32 and self.device.type == "cpu"
                              and kernels() is not None)
        self.kv = allocate_kv_cache(kv_cache_dtype, num_blocks, block_size=block_size, shape=model.shape,
                                    dtype=dtype, device=self.device, num_staging_slots=num_staging_slots)
        self.decode_stack = None
        if self.native_decode:
            model.use_native_ops()

    def enable_decode_stack(self) -> None:
        """Run steps of decodes (and short draft trees) through the native layer stack; call once the weights
        are final."""
        if self.native_decode:
            self.decode_stack = build_decode_stack(self.model, self.kv)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, samplers: dict[str, list[Request]]) -> ModelRunnerOutput:
        """Run the step and sample. samplers: for each chunk with sample=True, the requests that draw from its
        last row: its own, then any samples forked from it this step (they share the prompt's logits)."""
        logits = self.logits(plan)
        return self.sample(plan, logits, samplers)

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
        stack = self.decode_stack if meta.row_tables is not None else None
        logits = self.model(input_ids, positions, meta, self.kv.layers, logits_indices, stack)
        self.kv.seal(to_seal)
        return logits

    def sample(self, plan: SchedulerOutput, logits: torch.Tensor,
               samplers: dict[str, list[Request]]) -> ModelRunnerOutput:
        """Next tokens: drawn by the sampler (one batched call for the plain rows), or accepted by verifying a
        chunk's draft tree."""
        out = ModelRunnerOutput()
        rows: list[int] = []
        reqs: list[Request] = []
        row = 0
        for c in plan.chunks:
            if not c.sample:
                continue
            owner, *forks = samplers[c.request_id]
            out.token_ids[c.request_id] = []    # keeps plan order
            k = c.num_draft_tokens
            if k:
                tokens, path = verify(logits[row:row + 1 + k], DraftTree(c.token_ids[-k:], c.draft_parents), owner)
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
            result = sample(picked, reqs)
            for req, token, lp in zip(reqs, result.token_ids, result.logprobs):
                out.token_ids[req.request_id] = [token]
                out.logprobs[req.request_id] = [lp]
        return out

    def _prepare(self, plan: SchedulerOutput):
        bs = self.block_size
        kvh = self.model.shape.num_kv_heads
        dev = self.device
        ids: list[int] = []
        pos: list[int] = []
        logits_indices: list[int] = []
        for c in plan.decodes:
            ids.append(c.token_ids[0])
            pos.append(c.start_pos)
            logits_indices.append(len(ids) - 1)

        # Decodes, with short draft trees riding along, run in the native stack: its rows replace the
        # per-chunk metadata of the module path, which is then not built.
        use_stack = self.decode_stack is not None and all(c.num_draft_tokens and len(c.token_ids) <= STACK_MAX_CHUNK
                                                          for c in plan.spans)
        decode_rows = decode_bias = decode_tables = decode_lens = None
        # (with drafted chunks in the stack, _stack_rows lays out the decodes' rows along with theirs)
        if plan.decodes and self.native_decode and not (use_stack and plan.spans):
            width = max(len(c.block_ids) for c in plan.decodes)
            decode_tables = torch.tensor([c.block_ids + [0] * (width - len(c.block_ids)) for c in plan.decodes]).to(dev)
            decode_lens = torch.tensor([c.start_pos + 1 for c in plan.decodes]).to(dev)
        elif plan.decodes and not use_stack:
            width = max(len(c.block_ids) for c in plan.decodes)
            tables = torch.tensor([c.block_ids + [0] * (width - len(c.block_ids)) for c in plan.decodes])
            decode_rows = head_block_rows(tables, kvh).to(dev)
            ctx = torch.tensor([c.start_pos + 1 for c in plan.decodes])
            valid = torch.arange(width * bs)[None, :] < ctx[:, None]
            dtype = self.model.embed_tokens.weight.dtype
            decode_bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf"))[:, None, None, :]
            decode_bias = decode_bias.to(dev)

        prefills: list[PrefillChunk] = []
        for c in plan.spans:
            n, start, k = len(c.token_ids), c.start_pos, c.num_draft_tokens
            ctx_len = start + n
            if not use_stack:
                mask = None
                if start > 0 or k:  # earlier KV exists, or a draft tree: causal with an offset, tree for drafts
                    mask = torch.arange(ctx_len)[None, :] <= (start + torch.arange(n))[:, None]
                    if k:
                        mask[n - k:, ctx_len - k:] = tree_mask(c.draft_parents)
                    mask = mask.to(dev)
                table = torch.tensor(c.block_ids[:-(-ctx_len // bs)])
                prefills.append(PrefillChunk(len(ids), n, ctx_len, head_block_rows(table, kvh).to(dev), mask))
            ids.extend(c.token_ids)
            if k:
                committed = n - k
                pos.extend(range(start, start + committed))
                pos.extend(start + committed - 1 + d for d in tree_depths(c.draft_parents))
                if c.sample:   # the last committed token's row, then every draft token's
                    logits_indices.extend(range(len(ids) - k - 1, len(ids)))
            else:
                pos.extend(range(start, ctx_len))
                if c.sample:
                    logits_indices.append(len(ids) - 1)

        row_tables = row_lens = row_masks = None
        if use_stack and plan.spans:
            row_tables, row_lens, row_masks = self._stack_rows(plan)
        elif use_stack:
            row_tables, row_lens = decode_tables, decode_lens

        positions = torch.tensor(pos, dtype=torch.long)
        slots = [(c.block_ids[p // bs], p % bs) for c in plan.chunks
                 for p in range(c.start_pos, c.start_pos + len(c.token_ids))]
        write_blocks = torch.tensor([b for b, _ in slots], dtype=torch.long)
        write_offsets = torch.tensor([o for _, o in slots], dtype=torch.long)
        meta = AttentionMetadata(
            write_blocks=write_blocks.to(dev),
            write_offsets=write_offsets.to(dev),
            num_decodes=len(plan.decodes),
            decode_head_blocks=decode_rows,
            decode_bias=decode_bias,
            decode_tables=decode_tables,
            decode_lens=decode_lens,
            prefills=prefills,
            row_tables=row_tables,
            row_lens=row_lens,
            row_masks=row_masks,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev), positions.to(dev), meta,
                torch.tensor(logits_indices, dtype=torch.long, device=dev))

    def _stack_rows(self, plan: SchedulerOutput):
        """Every query row of a batch of decodes and drafted chunks as a decode: its request's blocks, the
        context up to and including itself, and (draft tokens) which earlier drafts it sees."""
        tables: list[list[int]] = []
        lens: list[int] = []
        masks: list[int] = []
        for c in plan.decodes:
            tables.append(c.block_ids)
            lens.append(c.start_pos + 1)
            masks.append(-1)
        for c in plan.spans:
            committed = len(c.token_ids) - c.num_draft_tokens
            for i in range(len(c.token_ids)):   # drafts sit in the slots after the committed tokens
                tables.append(c.block_ids)
                lens.append(c.start_pos + i + 1)
            masks.extend([-1] * committed)
            masks.extend(tree_visibility_bits(c.draft_parents) if c.num_draft_tokens else [])
        width = max(len(t) for t in tables)
        dev = self.device
        return (torch.tensor([t + [0] * (width - len(t)) for t in tables]).to(dev), torch.tensor(lens).to(dev),
                torch.tensor(masks, dtype=torch.long).to(dev))
