"""Turns logits into tokens, request by request settings, batch-independently.

Order: penalties -> temperature -> top-k / top-p / min-p -> draw. Greedy rows
take the argmax of the penalised logits. Each sampling row draws with its own
request's torch.Generator, so a seed gives the same tokens whatever else is
in the batch. Logprobs are of the model's raw distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.engine.request import Request


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # the N most likely tokens, best first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
    """logits: [len(requests), vocab], one row per request."""
    logits = logits.float()
    raw = logits
    if any(r.params.needs_penalties for r in requests):
        logits = logits.clone()
        for i, r in enumerate(requests):
            if r.params.needs_penalties:
                _apply_penalties(logits[i], r)

    tokens = torch.empty(len(requests), dtype=torch.long)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if greedy:
        idx = torch.tensor(greedy)
        tokens[idx] = logits[idx].argmax(dim=-1)
    for i, r in enumerate(requests):
        if not r.params.greedy:
            tokens[i] = _draw(logits[i], r)

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


def _draw(row: torch.Tensor, r: Request) -> int:
    return int(torch.multinomial(target_probs(row, r.params), 1, generator=r.generator).item())


def target_probs(row: torch.Tensor, p) -> torch.Tensor:
    """The distribution a sampling row draws from: temperature, then top-k, min-p, top-p."""
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[-1]:
        kth = row.topk(p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = cum - sorted_p >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs
