"""Speculation without a draft model (`--speculative lookahead`): n-gram tries propose, the target verifies.

Drafts come from two tries (ngram_trie.py, in C++ when the native kernels
are on): one per request over its own prompt and output, and a global one
over recent requests' outputs, bounded in nodes (the oldest request's n-grams
leave first). The request's own trie is asked first: its text is the
likeliest to repeat.

How many tokens each request drafts is decided per step (after FASER): a
request's acceptance rate is tracked as a running ratio of accepted to
rejected draft positions, its j-th draft token is worth a^j expected tokens,
and draft tokens go to the requests where they are worth most for as long as
(tokens produced) / (measured cost of the pass) keeps rising. At batch 1 a
pass of 8 tokens costs little more than one, so guesses are cheap; in a
large, compute-bound batch they are not, and speculation fades out by itself.
A request whose guesses keep failing stops drafting; its estimate drifts back
towards the prior while idle, so it is retried now and then. Where the cost
curve is wrong, the guard (guard.py) sees drafted steps run slower than plain
ones of the same batch size and stops drafting there.

Only requests without penalties or logprobs speculate (their distributions
would depend on the draft path); they decode normally.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from kvloom.engine.request import Request
from kvloom.engine.scheduler_output import SchedulerOutput
from kvloom.attention.backend import STACK_MAX_CHUNK
from kvloom.speculation.guard import SpeculationGuard
from kvloom.speculation.ngram_trie import DraftTree, new_trie
from kvloom.speculation.step_cost import StepCost

_DECAY = 0.8          # weight of the past in the acceptance estimate
_PRIOR = 0.5          # acceptance assumed for a request that has not speculated yet
_RELAX = 0.05         # per idle step, how far the estimate moves back to the prior
_GLOBAL_DOC_TOKENS = 1024   # a finished request adds at most its last this-many output tokens


@dataclass(frozen=True)
class SpecSettings:
    max_tokens: int = 8          # draft tokens per request per step at most
    branches: int = 2            # children per draft node at most
    max_match: int = 3           # trailing context tokens looked up in a trie
    global_max_nodes: int = 200_000


class _RequestState:
    __slots__ = ("trie", "active", "fed", "hits", "misses")

    def __init__(self, max_len: int, native):
        self.trie = new_trie(max_len, native)
        self.active = None
        self.fed = 0
        self.hits = _PRIOR       # running (decayed) counts of accepted and rejected draft positions
        self.misses = 1 - _PRIOR

    @property
    def acceptance(self) -> float:
        return self.hits / (self.hits + self.misses)


class LookaheadSpeculator:
    def __init__(self, settings: SpecSettings, step_cost: StepCost, native=None):
        """native: the native kernels module, whose tries count tokens ~28x faster (None: Python's)."""
        self.settings = settings
        self.step_cost = step_cost
        self._max_len = settings.max_match + settings.max_tokens
        self._native = native
        self.global_trie = new_trie(self._max_len, native)
        self._global_docs: deque[list[int]] = deque()
        self._states: dict[str, _RequestState] = {}
        self.num_verifications = 0
        self.num_proposed = 0      # draft tokens scored by the model
        self.num_accepted = 0      # of those, accepted
        self.guard = SpeculationGuard()   # measured drafted steps against plain ones (guard.py)

    def allows_drafts(self, num_decodes: int) -> bool:
        """The guard's word for a step of this many plain decodes (the only steps that draft)."""
        return self.guard.allows(num_decodes)

    def record_step(self, plan: SchedulerOutput, sampled: dict[str, int | list[int]], seconds: float) -> None:
        """Tell the guard what a decode-only step produced (every chunk a decode, drafted or not)."""
        chunks = plan.chunks
        if not chunks or any(c.num_draft_tokens == 0 and len(c.token_ids) != 1 for c in chunks):
            return
        tokens = sum(len(t) if isinstance(t, list) else 1 for t in sampled.values())
        self.guard.record(len(chunks), any(c.num_draft_tokens for c in chunks), tokens, seconds)

    @staticmethod
    def eligible(req: Request) -> bool:
        p = req.params
        return bool(req.output_token_ids) and not p.needs_penalties and p.logprobs is None

    def _state(self, req: Request) -> _RequestState:
        st = self._states.get(req.request_id)
        if st is None:
            st = self._states[req.request_id] = _RequestState(self._max_len, self._native)
        return st

    @staticmethod
    def _feed(st: _RequestState, req: Request) -> None:
        """Bring the request's trie up to its tokens. Only before drafting: the trie catches up from where it
        stood, so steps that draft nothing (most, at 32 concurrent requests) skip the work."""
        st.active = st.trie.extend(req.all_token_ids, st.fed, st.active)
        st.fed = len(req.all_token_ids)

    def _draft(self, req: Request, st: _RequestState, max_tokens: int) -> DraftTree | None:
        s = self.settings
        ctx = req.all_token_ids
        return (st.trie.draft(ctx, max_tokens, s.max_match, s.branches)
                or self.global_trie.draft(ctx, max_tokens, s.max_match, s.branches))

    def propose(self, candidates: list[tuple[Request, int]], base_tokens: int, base_yield: int,
                budget: int, decode_only: bool = False) -> dict[str, DraftTree]:
        """Drafts for this step. candidates: (request, most draft tokens it may take); base_tokens: tokens
        already in the pass; base_yield: tokens the pass produces without speculation; decode_only: the
        pass holds nothing but plain decodes (the native decode stack's path)."""
        cost = self.step_cost
        # A pass of plain decodes and short draft trees runs in the native stack, where a draft token costs a
        # row like any other; otherwise drafted decodes leave the batched decode path as chunks of their own.
        stack = decode_only and self.settings.max_tokens < STACK_MAX_CHUNK

        def pass_cost(num_tokens: int, num_chunks: int, context: int) -> float:
            if stack:   # every row attends over its request's context
                return cost.decode_only(num_tokens) + context * cost.per_context_token
            return cost(num_tokens) + num_chunks * cost.per_chunk

        context = sum(req.num_tokens for req, _ in candidates)   # the decodes' rows (those that may draft)
        live = [(req, self._state(req), min(room, self.settings.max_tokens)) for req, room in candidates]
        most = min(budget, sum(max(0, room) for _, _, room in live))
        shortest = min(req.num_tokens for req, _ in candidates) if candidates else 0
        if not most or _cannot_pay(max(st.acceptance for _, st, _ in live), base_tokens, base_yield, context,
                                   shortest, most, pass_cost, cost.decode_sizes if stack else cost.sizes):
            for _, st, _ in live:
                _drift_to_prior(st)
            return {}
        trees: dict[str, DraftTree] = {}
        states: dict[str, _RequestState] = {}
        reqs: dict[str, Request] = {}
        heap: list[tuple[float, int, str]] = []
        limit: dict[str, int] = {}
        for order, (req, st, room) in enumerate(live):
            self._feed(st, req)
            tree = self._draft(req, st, room) if room > 0 else None
            if tree is None:
                _drift_to_prior(st)
                continue
            rid = req.request_id
            trees[rid], states[rid], reqs[rid], limit[rid] = tree, st, req, len(tree)
            heapq.heappush(heap, (-st.acceptance, order, req.request_id))
        # Greedy: each next draft token goes where its expected yield is highest; of the allotments met on
        # the way, the one with the most tokens per second wins. Not "stop at the first token that does
        # not pay": a pass's cost can jump at its second row and then stay flat (fp32 on this CPU: 47 ms
        # for one row, 83 for two to eight), where one draft token loses and six win.
        given: dict[str, int] = {}
        taken: list[str] = []
        tokens, produced, chunks = base_tokens, float(base_yield), 0
        best_rate, best_len = produced / pass_cost(tokens, 0, context), 0
        while heap and budget > 0:
            neg_gain, order, rid = heapq.heappop(heap)
            chunks += rid not in given            # its first draft token moves it out of the decode batch
            produced, tokens, budget = produced - neg_gain, tokens + 1, budget - 1
            context += reqs[rid].num_tokens
            taken.append(rid)
            k = given[rid] = given.get(rid, 0) + 1
            rate = produced / pass_cost(tokens, chunks, context)
            if rate > best_rate:
                best_rate, best_len = rate, len(taken)
            if k < limit[rid]:
                heapq.heappush(heap, (neg_gain * states[rid].acceptance, order, rid))
        given = {}
        for rid in taken[:best_len]:
            given[rid] = given.get(rid, 0) + 1
        out: dict[str, DraftTree] = {}
        for rid, tree in trees.items():
            k = given.get(rid, 0)
            if k == 0:
                _drift_to_prior(states[rid])   # not drafting this step: let a poor estimate recover slowly
                continue
            # Fewer tokens than drafted: draft again with k, which keeps the k likeliest nodes.
            out[rid] = tree if k == len(tree) else self._draft(reqs[rid], states[rid], k)
        return out

    def observe(self, req: Request, tree: DraftTree, path: list[int]) -> None:
        """Verification accepted `path` (draft indices) of `tree`."""
        st = self._states.get(req.request_id)
        self.num_verifications += 1
        self.num_proposed += len(tree)
        self.num_accepted += len(path)
        if st is None:
            return
        # The accepted positions, and one rejection unless the walk ran off the end of a branch (a leaf).
        end = path[-1] if path else -1
        reached_leaf = bool(path) and end not in tree.parents
        st.hits = _DECAY * st.hits + len(path)
        st.misses = _DECAY * st.misses + (0 if reached_leaf else 1)

    def export_state(self, req: Request) -> dict | None:
        """What a moved request takes along: its acceptance estimate (its trie is rebuilt from its tokens)."""
        st = self._states.get(req.request_id)
        return None if st is None else {"hits": st.hits, "misses": st.misses}

    def import_state(self, req: Request, state: dict | None) -> None:
        if state is not None:
            st = self._states[req.request_id] = _RequestState(self._max_len, self._native)
            st.hits, st.misses = state["hits"], state["misses"]

    def drop(self, req: Request) -> None:
        """The request left this engine (moved elsewhere): forget it without learning from its output."""
        self._states.pop(req.request_id, None)

    def finish(self, req: Request) -> None:
        """The request is done: its output joins the global trie; its own trie goes."""
        self._states.pop(req.request_id, None)
        doc = req.output_token_ids[-_GLOBAL_DOC_TOKENS:]
        if len(doc) < 2:
            return
        self.global_trie.extend(doc)
        self._global_docs.append(doc)
        while self.global_trie.num_nodes > self.settings.global_max_nodes and self._global_docs:
            self.global_trie.extend(self._global_docs.popleft(), delta=-1)

    def stats(self) -> dict:
        v = self.num_verifications
        return {"verifications": v, "proposed": self.num_proposed, "accepted": self.num_accepted,
                "acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
                "mean_accepted_length": self.num_accepted / v if v else 0.0,
                "global_trie_nodes": self.global_trie.num_nodes, "guard": self.guard.stats()}


def _cannot_pay(best_gain: float, base_tokens: int, base_yield: int, context: int, shortest: int, most: int,
                pass_cost, breakpoints: list[int]) -> bool:
    """No allotment of up to `most` draft tokens raises the pass's tokens per second, so propose() would choose
    none: its drafting (a tree search per request, whose Python time was the whole of speculation's loss at 16+
    concurrent requests) is skipped. Each draft token yields at most the best acceptance estimate, and k tokens
    cost at least a pass of base + k tokens with one chunk more, each row attending over at least the shortest
    candidate's context; the step cost is piecewise linear in tokens, so the best ratio sits at k = 1,
    k = most or where base + k meets a measured size."""
    base_rate = base_yield / pass_cost(base_tokens, 0, context)
    ks = {1, most} | {n - base_tokens for n in breakpoints if 0 < n - base_tokens < most}
    return all((base_yield + best_gain * k) / pass_cost(base_tokens + k, 1, context + k * shortest) <= base_rate
               for k in ks)


def _drift_to_prior(st: _RequestState) -> None:
    """An idle request's estimate creeps back up towards the prior, so one that stopped drafting is retried."""
    if st.acceptance < _PRIOR:
        st.hits += _RELAX * (_PRIOR - st.acceptance) * (st.hits + st.misses)
