"""Dynamic SplitFuse scheduling over the paged KV pool.

Each step has a token budget (max_num_batched_tokens) and a cap on running
requests (max_num_seqs). Running decodes go first, one token each; the rest of
the budget takes prompt chunks, from partly prefilled requests and then from
the waiting queue, so a long prompt streams in over several steps while
decodes keep moving. A newly admitted request first takes whatever leading
blocks of its tokens the prefix cache holds, and computes only the rest.

Requests are ordered by priority (lower first, as in vLLM), then arrival.
When the pool runs dry, a request about to decode preempts the last running
request in that order that this step has not scheduled yet (it may be
itself): its blocks are freed and it waits at the head of its priority class
to be recomputed. Requests never yield to later ones, so the first always
progresses, and the engine never deadlocks. A queued request more urgent
than some running ones preempts them (least urgent first) when it lacks a
seat or blocks.

A paused sample (a search holds it between rounds: Engine.pause_sample) is never scheduled and gives way
first: when anyone lacks a seat or blocks, the newest paused running request is preempted before any
other (idle sessions still go first), so paused samples never hold up the requests they wait for.

Forked samples share their parent's blocks; the first write into a shared,
partly filled block copies it first (copy-on-write, listed in the plan).

A model with sliding-window layers (kv/window_pages.py) counts pages: a block
costs 1 + num_groups pages while some request's window covers it and one page
after, so the pool checks below multiply by pages_per_block.

With a TPOT target (engine/tpot_target.py), a step that carries decodes gives its prompt chunks only the
tokens the target leaves, and nobody new is admitted while the running requests' decodes would fill it.

With a speculator, decodes may carry draft tokens in steps of nothing but
decodes: they take what is left of the budget and only free blocks (a guess
never preempts anyone), and such a decode travels as a short chunk with a
tree mask.
"""
from __future__ import annotations

import bisect
import time
from collections import deque

from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from kvloom.kv.block_pool import BlockPool
from kvloom.kv.prefix_cache import PrefixCache
from kvloom.kv.session_store import SessionStore
from kvloom.kv.window_pages import WindowPages


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_cache: PrefixCache | None = None, sessions: SessionStore | None = None,
                 speculator=None, window: WindowPages | None = None):
        self.pool = pool
        self.window = window
        self.pages_per_block = 1 if window is None else window.pages_per_block
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.sessions = sessions
        self.speculator = speculator
        self.lora = None           # a LoraManager when adapters are served: running requests pin their slots
        self.tpot = None           # a TpotTarget: steps with decodes sized to keep their pace (engine/tpot_target.py)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # sorted by arrival order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._num_added = 0        # tie-break of equal arrival times (keeps the order total)

    # ---- queue management -------------------------------------------------------------

    def add(self, req: Request, front: bool = False) -> None:
        """Queue a request; `front`: one that already ran elsewhere (imported) waits at the head."""
        self._num_added += 1
        req.order = (req.priority, req.arrival_time, self._num_added)
        self.requests[req.request_id] = req
        if front:
            self._queue_front(req)
        else:
            self._queue_in_order(req)

    def _queue_in_order(self, req: Request) -> None:
        i = len(self.waiting)
        while i and self.waiting[i - 1].order > req.order:
            i -= 1
        self.waiting.insert(i, req)

    def _queue_front(self, req: Request) -> None:
        """Ahead of every new queued request of its priority or a later one (it ran before); among the
        others at the front, in order, so a request moved in is not pushed back by later preemptions."""
        i = 0
        while i < len(self.waiting) and (self.waiting[i].priority < req.priority or (
                self.waiting[i].queued_front and self.waiting[i].order < req.order)):
            i += 1
        req.queued_front = True
        self.waiting.insert(i, req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Ends a request (stopped, length or aborted) and frees its blocks. Unknown ids are ignored."""
        req = self._remove(request_id)
        if req is None:
            return None
        self._drop_window(req)   # a session keeps the blocks; their sliding pages stay keyed, for adopt()
        if self.sessions is not None and req.session_id and status != RequestStatus.FINISHED_ABORTED:
            # The program's next call continues from here: keep the KV of every computed token.
            rest = self.sessions.retain(req.session_id, req.all_token_ids[:req.num_computed_tokens],
                                        req.block_ids, req.block_keys)
            req.block_ids = rest
        self._release_blocks(req)
        req.status = status
        if self.speculator is not None:
            self.speculator.finish(req)
        return req

    def detach(self, request_id: str) -> Request:
        """Take a request out (it moves to another engine): its blocks are freed, nothing learns from it."""
        req = self._remove(request_id)
        self._release_blocks(req)
        if self.speculator is not None:
            self.speculator.drop(req)
        return req

    def _remove(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            (self.running if req.status == RequestStatus.RUNNING else self.waiting).remove(req)
            self._drop_adapter(req)
            if self.tpot is not None:
                self.tpot.forget(request_id)
        return req

    def _take_adapter(self, req: Request) -> bool:
        """Pin a slot for the request's adapter as it starts running; False: every slot is pinned by others."""
        if req.lora_name is None or self.lora is None:
            return True
        slot = self.lora.acquire(req.lora_name)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _drop_adapter(self, req: Request) -> None:
        if req.lora_slot >= 0:
            self.lora.release(req.lora_slot)
            req.lora_slot = -1

    def fork(self, parent: Request, child: Request, running: bool, computed: int | None = None) -> None:
        """Start `child` where `parent` stands now, sharing every block (no KV is copied yet).

        running: the child joins the running batch now (its first token was drawn from the parent's
        logits). Otherwise max_num_seqs is reached: it waits at the head of the queue sharing the prompt's
        blocks, and computes the prompt's last token itself once admitted (its logits give the first token).
        computed: how many of the parent's tokens the child takes the KV of (a fork of a sample part-way
        through its output: Engine.fork_sample).
        """
        self._num_added += 1
        child.order = (child.priority, child.arrival_time, self._num_added)
        child.num_cached_tokens = parent.num_cached_tokens
        self.requests[child.request_id] = child
        if computed is None:
            computed = parent.num_computed_tokens if running else child.num_prompt_tokens - 1
        blocks = parent.block_ids[:-(-computed // self.block_size)]
        for b in blocks:
            self.pool.share(b)
        child.block_ids = list(blocks)
        child.block_keys = parent.block_keys[:computed // self.block_size]
        child.num_computed_tokens = computed
        self.hold_window(child)
        if running:
            child.first_scheduled_time = parent.first_scheduled_time
            child.status = RequestStatus.RUNNING
            if parent.lora_slot >= 0:       # the same adapter, the same slot, pinned once more
                child.lora_slot = parent.lora_slot
                self.lora.pin(child.lora_slot)
            bisect.insort(self.running, child, key=_order)
        else:
            self._queue_front(child)

    # ---- one step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        if self.sessions is not None:
            self.sessions.expire()
        self._preempt_for_urgent(out, budget)

        for req in list(self.running):                       # 1. decodes, in order
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING or req.num_uncomputed != 1 or req.paused:
                continue   # (accepted drafts not in their KV slots make a short chunk in 2.)
            if not self._grow(req, 1, scheduled, out, can_shrink=False):
                continue
            out.decodes.append(self._chunk(req, 1))
            scheduled.add(req.request_id)
            budget -= 1

        if self.tpot is not None and out.decodes:            # keep the decoders' pace (engine/tpot_target.py)
            slack = self.tpot.slack(c.request_id for c in out.decodes)
            room = self.tpot.prompt_tokens_within(len(out.decodes), slack)
            if room is not None:
                budget = min(budget, max(self.tpot.min_chunk, room))

        for req in list(self.running):                       # 2. prompts already under way
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING or req.request_id in scheduled or req.paused:
                continue
            n = min(req.num_uncomputed, budget)
            n = self._grow(req, n, scheduled, out, can_shrink=True)
            if n:
                out.spans.append(self._chunk(req, n))
                scheduled.add(req.request_id)
                budget -= n

        # The requests whose decodes fill later steps (paused samples decode in none).
        pacing = 0 if self.tpot is None else sum(not r.paused for r in self.running)
        while budget > 0:                                    # 3. admissions
            if self.tpot is not None and pacing and not self.tpot.admits(pacing):
                break   # a new request decodes in every later step: only while they stay inside the target
            req = self._next_waiting()
            if req is None or (len(self.running) >= self.max_num_seqs and not self._preempt_paused(out)):
                break
            if not self._take_adapter(req):
                break                      # its adapter waits for a slot: in order, nobody jumps the queue
            self._take_cached_prefix(req)
            n = min(req.num_uncomputed, budget)
            while self._fits_in_free_blocks(req) < n and (self._release_a_session() or self._preempt_paused(out)):
                pass
            n = min(n, self._fits_in_free_blocks(req))
            if n <= 0:
                self._release_blocks(req)  # in order: nobody jumps the queue
                self._drop_adapter(req)
                break
            self.waiting.remove(req)
            if self.prefix_cache is not None and req.first_scheduled_time is None:
                self.prefix_cache.record(req.num_tokens, req.num_computed_tokens)
            self._allocate(req, n, out)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
            bisect.insort(self.running, req, key=_order)
            pacing += 1
            # One token left of one that ran before (moved here, or a fork that waited): a plain decode.
            batched = n == req.num_uncomputed == 1 and req.output_token_ids
            (out.decodes if batched else out.spans).append(self._chunk(req, n))
            scheduled.add(req.request_id)
            budget -= n
        if self.speculator is not None and out.decodes and budget > 0:
            self._add_drafts(out, budget)
        return out

    def _add_drafts(self, out: SchedulerOutput, budget: int) -> None:
        # Only in steps of plain decodes. Beside prompt chunks, each drafted decode became a chunk of its own on
        # the module path, ~1.5 ms a draft token against ~0.7 a token otherwise at 32 concurrent requests, and
        # the guard times no such step (docs/performance.md, fifteenth sitting).
        if out.spans or not self.speculator.allows_drafts(len(out.decodes)):
            return
        candidates = []
        for c in out.decodes:
            req = self.requests[c.request_id]
            if self.speculator.eligible(req):
                # The last output token is never a draft's to fill: drafts + bonus stay within max_tokens.
                candidates.append((req, req.max_tokens - len(req.output_token_ids) - 1))
        if not candidates:
            return
        base_yield = sum(c.sample for c in out.chunks)
        trees = self.speculator.propose(candidates, out.num_tokens, base_yield, budget, decode_only=True)
        for c in list(out.decodes):
            tree = trees.get(c.request_id)
            if tree is None:
                continue
            req = self.requests[c.request_id]
            room = ((len(req.block_ids) + self.pool.num_free // self.pages_per_block) * self.block_size
                    - req.num_computed_tokens - 1)
            tree = tree.prefix(min(len(tree), room))
            if not tree.tokens:
                continue
            self._allocate(req, 1 + len(tree), out)
            c.token_ids = c.token_ids + tree.tokens
            c.num_draft_tokens, c.draft_parents = len(tree), tree.parents
            c.block_ids = list(req.block_ids)
            out.decodes.remove(c)
            out.spans.insert(0, c)

    def update(self, plan: SchedulerOutput, sampled: dict[str, int | list[int]],
               kept_drafts: dict[str, int] | None = None) -> None:
        """Advance each scheduled request past this step's committed tokens; append the sampled ones.

        kept_drafts: per request, how many accepted draft tokens already sit in their right KV slots
        (the leading run of the first branch); other accepted tokens are computed again next step.
        """
        for chunk in plan.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None:
                continue
            req.num_computed_tokens += len(chunk.token_ids) - chunk.num_draft_tokens
            if kept_drafts:
                req.num_computed_tokens += kept_drafts.get(chunk.request_id, 0)
            if chunk.sample:
                new = sampled[chunk.request_id]
                for t in new if isinstance(new, list) else (new,):
                    req.append_output(t)
            if self.prefix_cache is not None:
                self.prefix_cache.register(req.all_token_ids, req.block_ids, req.block_keys, req.num_computed_tokens,
                                           req.cache_salt)
            if self.window is not None:     # blocks now behind its window give their sliding pages back
                first = self.window.first_kept(req.num_computed_tokens)
                if first > req.window_first >= 0:
                    self.window.drop_range(req.block_ids[:first], req.window_first)
                    req.window_first = first

    # ---- helpers ----------------------------------------------------------------------

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req.request_id, req.all_token_ids[start:start + n], start,
                              list(req.block_ids), sample=start + n == req.num_tokens, lora_slot=req.lora_slot)

    def _take_cached_prefix(self, req: Request) -> None:
        """Start from KV already in the pool: the request's session's, else the prefix cache's."""
        if req.num_computed_tokens or req.block_ids:
            return
        session = self.sessions.adopt(req.session_id, req.all_token_ids) if self.sessions is not None else None
        if session is not None:
            req.block_ids, req.block_keys = session.block_ids, session.block_keys
            req.num_computed_tokens = len(session.tokens)
        elif self.prefix_cache is not None:
            blocks, block_keys = self.prefix_cache.match(req.all_token_ids, req.cache_salt)
            for b in blocks:
                self.pool.share(b)
            req.block_ids, req.block_keys = blocks, block_keys
            req.num_computed_tokens = len(blocks) * self.block_size
        if self.window is not None and req.block_ids:
            # Only as far as the sliding layers' pages reach: the window before the first token it computes.
            usable = self.window.usable(req.block_ids, req.num_computed_tokens)
            keep = -(-usable // self.block_size)
            self.pool.free(req.block_ids[keep:])
            req.block_ids, req.block_keys = req.block_ids[:keep], req.block_keys[:usable // self.block_size]
            req.num_computed_tokens = usable
            self.hold_window(req)
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens

    def _shared_tail(self, req: Request) -> bool:
        """The block the next token goes into is partly filled and shared with a fork: copy it first."""
        i = req.num_computed_tokens // self.block_size
        return (req.num_computed_tokens % self.block_size != 0 and i < len(req.block_ids)
                and self.pool.ref_count(req.block_ids[i]) > 1)

    def _blocks_needed(self, req: Request, n: int) -> int:
        total = -(-(req.num_computed_tokens + n) // self.block_size)
        return max(0, total - len(req.block_ids)) + self._shared_tail(req)

    def _pages_needed(self, req: Request, n: int) -> int:
        return self._blocks_needed(req, n) * self.pages_per_block

    def _fits_in_free_blocks(self, req: Request) -> int:
        """How many more tokens the request's blocks plus the free ones can hold."""
        blocks = len(req.block_ids) + self.pool.num_free // self.pages_per_block - self._shared_tail(req)
        return blocks * self.block_size - req.num_computed_tokens

    def _allocate(self, req: Request, n: int, out: SchedulerOutput) -> None:
        """Blocks for n more tokens (the caller checked they are free), copying a shared tail first."""
        if self._shared_tail(req):
            i = req.num_computed_tokens // self.block_size
            (fresh,) = self.pool.allocate(1)
            out.copies.append((req.block_ids[i], fresh))
            if self.window is not None:   # the copy gets sliding pages of its own, copied too
                self.window.hold(fresh, fresh=True)
                out.copies.extend(zip(self.window.pages_of(req.block_ids[i]), self.window.pages_of(fresh)))
                self.window.drop(req.block_ids[i])
            self.pool.free([req.block_ids[i]])
            req.block_ids[i] = fresh
        new = self.pool.allocate(self._blocks_needed(req, n))
        if self.window is not None:
            if req.window_first < 0:            # it held nothing: it holds from its first new block
                req.window_first = len(req.block_ids)
            for b in new:
                self.window.hold(b, fresh=True)
        req.block_ids += new

    def _grow(self, req: Request, n: int, scheduled: set[str], out: SchedulerOutput, can_shrink: bool) -> int:
        """Give req blocks for n more tokens, preempting newer unscheduled requests if needed.

        Returns the tokens it can run (n, fewer if can_shrink, or 0). A decode
        that cannot get its block even so preempts itself.
        """
        while self._pages_needed(req, n) > self.pool.num_free:
            if self._release_a_session() or self._preempt_paused(out):
                continue  # idle sessions' KV, then paused samples', goes before any running request is preempted
            victim = self._newest_unscheduled(scheduled, newer_than=req)
            if victim is None:
                break
            self._preempt(victim, out)
        if self._pages_needed(req, n) > self.pool.num_free:
            if can_shrink:
                n = self._fits_in_free_blocks(req)
                if n <= 0:
                    return 0
            else:
                self._preempt(req, out)
                return 0
        self._allocate(req, n, out)
        return n

    def _preempt_for_urgent(self, out: SchedulerOutput, budget: int) -> None:
        """The queue's head lacks a seat or blocks for its first chunk (and for this step's decodes that
        open a block) while less urgent requests run: preempt them, least urgent and newest first."""
        head = self._next_waiting()
        if head is None:
            return

        def short() -> bool:
            if len(self.running) >= self.max_num_seqs:
                return True
            opening = sum(1 for r in self.running if r.num_uncomputed == 1 and r.num_computed_tokens % self.block_size == 0)
            blocks = self._blocks_needed(head, min(head.num_uncomputed, budget)) + opening
            return blocks * self.pages_per_block > self.pool.num_free

        while self.running and self.running[-1].priority > head.priority and short():
            self._preempt(self.running[-1], out)

    def _next_waiting(self) -> Request | None:
        """The head of the queue, paused samples skipped (they wait to be unpaused, not for room)."""
        return next((r for r in self.waiting if not r.paused), None)

    def _preempt_paused(self, out: SchedulerOutput) -> bool:
        """Preempt the newest paused running request (its seat and blocks are needed); False: none runs."""
        victim = next((r for r in reversed(self.running) if r.paused), None)
        if victim is None:
            return False
        self._preempt(victim, out)
        return True

    def _release_a_session(self) -> bool:
        return self.sessions is not None and self.sessions.release_oldest()

    def _newest_unscheduled(self, scheduled: set[str], newer_than: Request) -> Request | None:
        for r in reversed(self.running):
            if r.order <= newer_than.order:
                return None
            if r.request_id not in scheduled:
                return r
        return None

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._release_blocks(req)
        self._drop_adapter(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._queue_front(req)
        out.preempted.append(req.request_id)

    def hold_window(self, req: Request) -> None:
        """Hold the sliding pages of the blocks the request's window covers (they exist: it starts where a
        holder stood, from what usable() allowed, or from an import's pages)."""
        if self.window is not None and req.block_ids:
            req.window_first = min(self.window.first_needed(req.num_computed_tokens), len(req.block_ids))
            self.window.hold_range(req.block_ids, req.window_first)

    def _drop_window(self, req: Request) -> None:
        if self.window is not None and req.window_first >= 0:
            self.window.drop_range(req.block_ids, req.window_first)
        req.window_first = -1

    def _release_blocks(self, req: Request) -> None:
        self._drop_window(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.block_keys = []
        req.num_computed_tokens = 0


def _order(req: Request) -> tuple[int, float, int]:
    return req.order
