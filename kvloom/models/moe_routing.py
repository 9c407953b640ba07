"""Mixture-of-experts routing: each token's top-k experts, and the batch's tokens grouped by expert.

Grouping is what makes a step's expert work a few large matmuls instead of one small one per token
(MoE-Lens / ExpertFlow on CPU: an expert's weights are read once a step, whatever number of tokens chose
it). The outputs are put back and summed in an order fixed by each token alone (its experts, ascending),
so a token's result does not depend on which other tokens share its step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, experts [T, k]) with each row's experts in ascending order.

    Softmax in float32 over all experts, then the top k (renormalised to sum to 1 when `normalize`: Mixtral
    always, Qwen-MoE per `norm_topk_prob`). Ascending expert order is the order the sum runs in."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    experts, slot = experts.sort(dim=-1)
    return weights.gather(-1, slot).to(router_logits.dtype), experts


@dataclass(frozen=True)
class ExpertGroups:
    """The batch's (token, slot) pairs sorted by expert: pair p is token p // k, slot p % k.

    order[lo:hi] for (expert, lo, hi) in spans are the pairs routed to that expert, in token order."""

    order: torch.Tensor                  # [T * k] pair indices, grouped by expert
    tokens: torch.Tensor                 # [T * k] the token of each pair in `order`
    spans: list[tuple[int, int, int]]    # (expert, lo, hi) of every expert at least one token chose


def group_by_expert(experts: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Group the pairs of `experts` [T, k] by expert: one stable sort, one count (a single host sync)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    spans, lo = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, lo, lo + n))
            lo += n
    return ExpertGroups(order, torch.div(order, k, rounding_mode="floor"), spans)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """Sum each token's weighted expert outputs: expert_out [T * k, H] in grouped order -> [T, H].

    The rows go back to (token, slot) order by a permutation (no accumulation), then slots are added left
    to right: each token's sum runs over its own experts in ascending order, as the reference's does."""
    t, k = weights.shape
    weighted = expert_out * weights.reshape(-1)[groups.order].unsqueeze(-1)
    by_pair = torch.empty_like(weighted)
    by_pair[groups.order] = weighted
    by_pair = by_pair.view(t, k, -1)
    out = by_pair[:, 0].clone()
    for j in range(1, k):
        out += by_pair[:, j]
    return out
