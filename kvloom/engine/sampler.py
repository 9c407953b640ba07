"""Turns logits into tokens, request by request settings, batch-independently.

Order: penalties -> grammar mask -> temperature -> top-k / top-p / min-p -> draw. Greedy rows
take the argmax of the penalised logits. The filters run over all sampling rows
at once (one softmax, one top-k, one cumulative sum for the batch); every
operation works along a row, so a row's result does not depend on the others.
Each sampling row draws one uniform number from its own request's
torch.Generator and inverts its cumulative distribution, so a seed gives the
same tokens whatever else is in the batch. Logprobs are of the model's raw
distribution. A constrained row (structured outputs) has the tokens its grammar forbids set to -inf; the
other rows are never touched.

With `native` (the engine's native kernels), a sampled row's filters and draw run in one kernel a row
(kernels/sampler_draw.cpp: draw_rows): the same filters and inverse-CDF draw over the same order of
tokens, its nucleus found without sorting the vocabulary (lowest index first among equal probabilities);
the probabilities equal torch's up to float rounding. Greedy rows take the kernels' argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.engine.request import Request
from kvloom.kernels import kernels
from kvloom.structured.matcher import apply_masks, grammar_masks


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # the N most likely tokens, best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, requests: list[Request], masks: dict | None = None,
           native: bool = False) -> SamplerOutput:
    """logits: [len(requests), vocab], one row per request. masks: grammar masks already computed, by request
    id (structured/matcher.py: masks_during_forward); other constrained rows get theirs here. native: draw
    with the native kernels (the same filters and draw, faster)."""
    logits = logits.float()
    raw = logits
    if any(r.params.needs_penalties for r in requests):
        logits = logits.clone()
        for i, r in enumerate(requests):
            if r.params.needs_penalties:
                _apply_penalties(logits[i], r)
    # Constrained rows: their grammar's mask, applied to the row copies below (never to the batch's logits).
    masks = grammar_masks(requests, masks)

    n = len(requests)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if len(greedy) == n:   # the batch's argmax as it is: no gather and no scatter (~3 ops a step at batch 1)
        tokens = _argmax(logits, native)
    else:
        tokens = torch.empty(n, dtype=torch.long)
        if greedy:
            tokens[torch.tensor(greedy)] = _argmax(_rows(logits, greedy, n), native)
    if greedy and masks:
        # A greedy row whose argmax the grammar allows keeps it: it is the masked row's argmax too.
        refused = [i for i in greedy if i in masks and not masks[i].allows(int(tokens[i]))]
        if refused:
            sub = logits[torch.tensor(refused)]
            apply_masks(sub, [masks[i].words for i in refused])
            tokens[torch.tensor(refused)] = sub.argmax(dim=-1)
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
    if drawn:
        idx = torch.tensor(drawn)
        sub = _rows(logits, drawn, n)
        if masks and any(i in masks for i in drawn):
            rows = [j for j, i in enumerate(drawn) if i in masks]
            if sub is logits:
                sub = sub.clone()   # the masks go on a copy; the batch's logits (and logprobs) stay raw
            apply_masks(sub, [masks[drawn[j]].words for j in rows], rows)
        params = [requests[i].params for i in drawn]
        uniforms = torch.cat([torch.rand(1, generator=requests[i].generator) for i in drawn])
        if native:
            tokens[idx] = _draw_native(sub, params, uniforms)
        else:
            tokens[idx] = _draw(_filtered_probs(sub, params), params, uniforms)

    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(requests)
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(raw[torch.tensor(want)], dim=-1)
        for row, i in enumerate(want):
            k = requests[i].params.logprobs
            top_v, top_i = lp[row].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            logprobs[i] = TokenLogprobs(token_list[i], lp[row, token_list[i]].item(),
                                        list(zip(top_i.tolist(), top_v.tolist())))
    return SamplerOutput(token_list, logprobs)


def _rows(t: torch.Tensor, rows: list[int], n: int) -> torch.Tensor:
    """t's rows `rows` (sorted, of its n): t itself when they are all of them. Gathering a whole [48, 49k]
    batch was a third of a sampled step's sampler time."""
    return t if len(rows) == n else t[torch.tensor(rows)]


def _argmax(t: torch.Tensor, native: bool) -> torch.Tensor:
    """torch.argmax over the last dimension; the native kernel's is ~10x faster than torch's scalar loop."""
    return kernels().argmax_rows(t.contiguous()) if native and t.shape[1] else t.argmax(dim=-1)


def _apply_penalties(row: torch.Tensor, r: Request) -> None:
    """In place. Repetition penalty over prompt and output (as vLLM); presence/frequency over output."""
    p = r.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(r.output_token_ids, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty


def draw_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: per row, the first token whose cumulative mass exceeds u * total mass (probs need not
    be normalised; a zero-probability token is never chosen, since the cumulative sum does not grow there)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


# Top-p looks for each row's nucleus among its likeliest 256 tokens, then 4096, then all: a full sort of a
# 49k vocabulary costs ~1.7 ms a row here, a top-256 ~0.1 ms, and most rows' nucleus is small.
_TOP_P_CANDIDATES = (256, 4096)


def target_probs(row: torch.Tensor, p) -> torch.Tensor:
    """The distribution one row draws from (speculative verification uses it too)."""
    return batched_target_probs(row[None], [p])[0]


def batched_target_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[rows, vocab] distributions: temperature, then top-k, min-p, top-p, each row by its own settings."""
    probs = _filtered_probs(logits, params)
    nucleus, top_p = _top_p_rows(params, probs.dtype)
    if nucleus:
        _top_p(probs, nucleus, top_p)
    return probs


def _top_p_rows(params: list, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    """The rows with a top-p below 1, and their top-p values."""
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    return rows, torch.tensor([params[i].top_p for i in rows], dtype=dtype)


def _draw(probs: torch.Tensor, params: list, uniforms: torch.Tensor) -> torch.Tensor:
    """One token a row from _filtered_probs' distributions with each row's top-p applied. A nucleus row draws
    among its sorted candidates (the same tokens and probabilities batched_target_probs keeps), without
    rebuilding a vocabulary-wide distribution: that scatter and a 49k cumulative sum were most of a
    sampled step's sampler time."""
    n = len(params)
    tokens = torch.empty(n, dtype=torch.long)
    nucleus, top_p = _top_p_rows(params, probs.dtype)
    whole = [i for i, p in enumerate(params) if p.top_p >= 1.0]
    if whole:
        rows = torch.tensor(whole)
        tokens[rows] = draw_from(_rows(probs, whole, n), uniforms[rows])
    if nucleus:
        rows = torch.tensor(nucleus)
        tokens[rows] = _draw_nucleus(_rows(probs, nucleus, n), top_p, uniforms[rows])
    return tokens


def _draw_native(logits: torch.Tensor, params: list, uniforms: torch.Tensor) -> torch.Tensor:
    """_draw(_filtered_probs(...)) in one native kernel a row (kernels/sampler_draw.cpp: draw_rows): the
    same filters and draw, the probabilities equal up to float rounding. On the default model's logits, 48
    sampled rows took 6.8 ms of sampling a step through the torch path's steps, and take ~1.2 ms this way."""
    settings = [(p.temperature, p.top_k, p.top_p, p.min_p) for p in params]
    temps, ks, top_ps, min_ps = zip(*settings)
    return kernels().draw_rows(logits.contiguous(), torch.tensor(temps), torch.tensor(ks), torch.tensor(top_ps),
                               torch.tensor(min_ps), uniforms)


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, top-k, softmax and min-p (top-p is applied by the caller)."""
    vocab = logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    x = logits / temps
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        top = x.topk(max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks])[:, None])
        kth[torch.tensor([k == 0 for k in ks])] = float("-inf")
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    min_ps = [p.min_p for p in params]
    if any(min_ps):
        floor = torch.tensor(min_ps, dtype=probs.dtype)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _nuclei(probs: torch.Tensor, top_p: torch.Tensor):
    """Each row's nucleus, searched among its likeliest 256 tokens, then 4096, then all: yields
    (row indices, kept sorted probabilities [rows, c], their token ids [rows, c]) per stage."""
    vocab = probs.shape[1]
    left = torch.arange(probs.shape[0])
    for c in (*(min(c, vocab) for c in _TOP_P_CANDIDATES), vocab):
        vals, order = probs[left].topk(c, dim=-1)
        found = vals.sum(-1) >= top_p[left] if c < vocab else torch.ones(len(left), dtype=torch.bool)
        done = left[found]
        if len(done):
            yield done, _nucleus(vals[found], top_p[done]), order[found]
        left = left[~found]
        if not len(left):
            break


def _top_p(probs: torch.Tensor, rows: list[int], top_p: torch.Tensor) -> None:
    """In place: keep each row's smallest set of likeliest tokens whose mass reaches its top_p."""
    sub = probs[rows]
    for done, kept, order in _nuclei(sub, top_p):
        sub[done] = torch.zeros_like(sub[done]).scatter_(1, order, kept)
    probs[rows] = sub


def _draw_nucleus(probs: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws over each row's nucleus in order of likelihood."""
    tokens = torch.empty(probs.shape[0], dtype=torch.long)
    for done, kept, order in _nuclei(probs, top_p):
        j = draw_from(kept, uniforms[done])
        tokens[done] = order.gather(1, j[:, None]).squeeze(1)
    return tokens


def _nucleus(sorted_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Sorted probabilities with those past the nucleus zeroed (the token that crosses top_p stays)."""
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]
    return sorted_p.masked_fill(drop, 0.0)
