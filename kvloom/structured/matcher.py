"""A request's grammar state and the token masks it puts on its logits rows.

The matcher follows the request's output tokens (sync), wherever they came from: sampled, accepted drafts,
replayed after a move or a preemption. Only constrained rows are masked; an unconstrained row is never
touched, so its tokens are exactly those it would draw without the constrained ones beside it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch



class RequestMatcher:
    def __init__(self, prototype: llguidance.LLMatcher, vocab_size: int, suppress_eos=()):
        self.m = prototype.deep_copy()
        self.words = (vocab_size + 31) // 32
        # ignore_eos: EOS is allowed only once the grammar allows nothing else (the output is complete)
        self.suppress_eos = sorted(suppress_eos)
        self.consumed = 0          # output tokens fed to the matcher so far
        # Why the grammar can no longer constrain this output (a refused token, or the library's error, e.g. a
        # lexer grown too complex mid-output): the engine then ends the request with this error rather than
        # let it go on unconstrained.
        self.error: str | None = None

    def sync(self, output_token_ids: list[int]) -> None:
        """Feed the output tokens the matcher has not seen."""
        for t in output_token_ids[self.consumed:]:
            if self.error is None and not self.m.consume_token(t):
                self.error = f"the grammar refused token {t} ({_headline(self.m.get_error())})"
        self.consumed = len(output_token_ids)

    def fill(self, row: torch.Tensor) -> None:
        """row: int32 [words], one bit per token, set when the token is allowed next."""
        if self.error is None and self.m.is_error():
            self.error = _headline(self.m.get_error())
        if self.error is not None:
            row.fill_(-1)    # any token: the request ends with the error after this step
        else:
            self.m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
            if self.m.is_stopped() and not row.any():   # nothing left to emit: let the row pick EOS freely
                row.fill_(-1)
            elif self.suppress_eos:
                kept = row.clone()
                for t in self.suppress_eos:
                    kept[t // 32] &= ~(1 << (t % 32)) if t % 32 != 31 else 0x7FFFFFFF
                if kept.any():
                    row.copy_(kept)

    def mask_rows(self, n: int) -> torch.Tensor:
        return torch.empty(n, self.words, dtype=torch.int32)


def _headline(library_error: str) -> str:
    """The library's error without the matcher state dump that follows its first line."""
    return library_error.strip().splitlines()[0] if library_error.strip() else "the grammar matcher failed"


class RowMask:
    """One row's allowed tokens, a bit each."""

    def __init__(self, words: torch.Tensor):
        self.words = words

    def allows(self, token: int) -> bool:
        if token >= 32 * self.words.numel():
            return False
        return bool((int(self.words[token // 32]) >> (token % 32)) & 1)


def grammar_masks(requests, ready: dict[str, RowMask] | None = None) -> dict[int, RowMask]:
    """Row -> mask of each constrained request (its matcher first catches up with its tokens); `ready` holds
    masks already computed, by request id."""
    ready = ready or {}
    out = {i: ready[r.request_id] for i, r in enumerate(requests) if r.request_id in ready}
    rows = [(i, r.matcher) for i, r in enumerate(requests) if r.matcher is not None and i not in out]
    if rows:
        bitmask = torch.empty(len(rows), rows[0][1].words, dtype=torch.int32)
        for j, (i, m) in enumerate(rows):
            m.sync(requests[i].output_token_ids)
            m.fill(bitmask[j])
        out.update({i: RowMask(bitmask[j]) for j, (i, _) in enumerate(rows)})
    return out


# One thread computes the step's grammar masks while the forward pass runs (torch's ops and llguidance's mask
# computation release the GIL). Only the engine thread submits, and waits before it samples, so a matcher is
# never used by two threads at once.
_mask_thread = None


def masks_during_forward(plan, samplers) -> Future | None:
    """Masks of the constrained requests that draw from a plain row this step (drafted chunks mask their tree
    in verification), computed in the background; None when there are none."""
    reqs = [r for c in plan.chunks if c.sample and not c.num_draft_tokens
            for r in samplers[c.request_id] if r.matcher is not None]
    if not reqs:
        return None
    global _mask_thread
    if _mask_thread is None:
        _mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvloom-masks")
    return _mask_thread.submit(_masks_by_id, reqs)


def _masks_by_id(reqs) -> dict[str, RowMask]:
    return {reqs[i].request_id: m for i, m in grammar_masks(reqs).items()}


def apply_masks(logits: torch.Tensor, masks: list[torch.Tensor] | torch.Tensor, rows: list[int] | None = None) -> None:
    """In place: tokens whose bit is clear get -inf in logits [n, vocab]'s rows (all of them, or `rows`), one
    int32 bit-word mask each. (numpy's unpackbits: ~3x faster here than shifting int32 words in torch.)"""
    bitmask = masks if isinstance(masks, torch.Tensor) else torch.stack(masks)
    n, vocab = bitmask.shape[0], logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    forbid = torch.from_numpy(bits.view(np.bool_)).logical_not_()
    if forbid.shape[1] >= vocab:
        forbid = forbid[:, :vocab]
    else:   # logits wider than the library's vocabulary: the extra ids never come out
        forbid = torch.cat([forbid, forbid.new_ones(n, vocab - forbid.shape[1])], 1)
    if rows is None or rows == list(range(logits.shape[0])):
        logits.masked_fill_(forbid, float("-inf"))
    else:
        idx = torch.tensor(rows)
        logits[idx] = logits[idx].masked_fill_(forbid, float("-inf"))


def mask_draft_tree(logits: torch.Tensor, tokens: list[int], parents: list[int], m: RequestMatcher) -> torch.Tensor:
    """Masked copy of a drafted chunk's rows [1 + k, vocab]: row 0 by the matcher's state, row i + 1 by its
    state after draft i's path. A draft the grammar refuses can never be accepted (its parent row masks it
    out), so its own row is left as it is: verification never reads it. The matcher ends where it began."""
    out = logits.float().clone()
    k = len(tokens)
    bitmask = m.mask_rows(1 + k)
    bitmask.fill_(-1)
    m.fill(bitmask[0])
    ok = [False] * k
    path: list[int] = []       # draft indices consumed into the matcher, root first
    if m.error is None:
        for i, (t, p) in enumerate(zip(tokens, parents)):
            if p != -1 and not ok[p]:
                continue              # below a refused draft: unreachable
            chain = _ancestors(p, parents)
            common = 0
            while common < min(len(path), len(chain)) and path[common] == chain[common]:
                common += 1
            if len(path) > common:
                m.m.rollback(len(path) - common)
            for j in chain[common:]:  # valid drafts, so these consume
                m.m.try_consume_tokens([tokens[j]])
            path = chain
            if m.m.try_consume_tokens([t]) != 1:
                continue
            ok[i] = True
            path = chain + [i]
            m.fill(bitmask[i + 1])
        if path:
            m.m.rollback(len(path))
    apply_masks(out, bitmask)
    return out


def _ancestors(node: int, parents: list[int]) -> list[int]:
    """node and its ancestors among the drafts, root first ([] for the root)."""
    out = []
    while node != -1:
        out.append(node)
        node = parents[node]
    return out[::-1]
