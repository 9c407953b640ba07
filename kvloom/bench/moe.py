"""`bench moe`: one sparse layer's experts for a step of decodes, tokens grouped by expert (what kvloom runs)
against each token through its own experts (the per-token loop grouping replaces), same process, alternating.

Grouping reads an expert's weights once a step however many tokens chose it; the loop reads them once per
token. The two give the same outputs (tests/test_moe.py); this measures what grouping saves.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvloom.kernels import kernels_status
from kvloom.models.moe import GroupedExperts
from kvloom.models.moe_routing import route
from kvloom.system_info import stack_description


def per_token_experts(experts: GroupedExperts, x: torch.Tensor, weights: torch.Tensor,
                      chosen: torch.Tensor) -> torch.Tensor:
    """Each token alone through its experts, in ascending order (the reference's sum order)."""
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    gate_up, down = experts.gate_up_proj.view(e, 2 * i, h), experts.down_proj.view(e, h, i)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(chosen.shape[1]):
            gate, up = F.linear(x[t:t + 1], gate_up[chosen[t, j]]).split(i, dim=-1)
            out[t:t + 1] += weights[t, j] * F.linear(F.silu(gate) * up, down[chosen[t, j]])
    return out


def run_moe_bench(hidden: int, intermediate: int, num_experts: int, top_k: int, batch_sizes: list[int],
                  repeats: int, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    experts = GroupedExperts(num_experts, hidden, intermediate)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    rows = []
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, hidden)
            weights, chosen = route(torch.randn(batch, num_experts), top_k, normalize=True)
            ways = {"grouped": lambda: experts(x, weights, chosen),
                    "per_token": lambda: per_token_experts(experts, x, weights, chosen)}
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(repeats):       # alternating, so the machine's other load falls on both alike
                for name, fn in ways.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            grouped, per_token = (statistics.median(times[n]) * 1e3 for n in ("grouped", "per_token"))
            rows.append({"batch": batch, "active_experts": int(chosen.unique().numel()),
                         "grouped_ms": grouped, "per_token_ms": per_token, "speedup": per_token / grouped})
    return {"hidden": hidden, "intermediate": intermediate, "num_experts": num_experts, "top_k": top_k,
            "repeats": repeats, "statistic": "median of alternating runs", "rows": rows,
            "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
            "stack": stack_description(), "cpu_isa": kernels_status().get("cpu_isa")}


def format_table(result: dict) -> str:
    lines = [f"experts {result['num_experts']} (top-{result['top_k']}), hidden {result['hidden']}, "
             f"expert intermediate {result['intermediate']}, {result['stack']['torch_threads']} thread(s)",
             "| decodes in the step | active experts | grouped (ms) | per token (ms) | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['active_experts']} | {r['grouped_ms']:.3f} | {r['per_token_ms']:.3f} | "
              f"{r['speedup']:.2f}x |" for r in result["rows"]]
    return "\n".join(lines)
