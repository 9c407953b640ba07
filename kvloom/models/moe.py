"""Mixture-of-experts models: Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE.

The Llama-family model with a sparse block in place of the MLP of some layers: a router picks each
token's top-k experts, the batch's tokens are grouped by expert (moe_routing.py) and every chosen expert
runs once on its rows. An expert's weights sit in one grouped parameter per projection ([E * 2I, H] for
gate/up, [E * H, I] for down), loaded from the checkpoint's per-expert tensors.

These layers run on the module path: the native decode stack and the quantized linears cover dense MLPs only
(has_experts() lets them say so).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.errors import UnsupportedArchitectureError
from kvloom.models.llama import MLP, LlamaForCausalLM, LlamaShape
from kvloom.models.moe_routing import combine, group_by_expert, route
from kvloom.models.rope import RotaryEmbedding

# How each family names its sparse block and its experts' gate, up and down projections.
_MIXTRAL_NAMES = ("block_sparse_moe", ("w1", "w3", "w2"))
_QWEN_NAMES = ("mlp", ("gate_proj", "up_proj", "down_proj"))
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class MoeShape(LlamaShape):
    """LlamaShape plus the experts: intermediate_size stays the dense MLP's (Qwen's mlp_only_layers)."""

    num_experts: int
    top_k: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int     # 0: no shared expert (Mixtral, Qwen3-MoE)
    normalize_top_k: bool
    sparse_layers: tuple[int, ...]
    hf_block: str                            # the sparse block's name in the checkpoint
    hf_expert_parts: tuple[str, str, str]    # the checkpoint's names of an expert's gate, up and down

    @classmethod
    def from_moe_hf(cls, cfg, *, qk_norm: bool = False) -> MoeShape:
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"mixture-of-experts with activation {act!r}; kvloom runs silu")
        base = LlamaShape.from_hf(cfg, qkv_bias=bool(getattr(cfg, "qkv_bias", False)), qk_norm=qk_norm)
        mixtral = getattr(cfg, "model_type", "") == "mixtral"
        num_experts = int(getattr(cfg, "num_experts", 0) or 0)
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(cfg, "mlp_only_layers", None) or ())
        sparse = tuple(i for i in range(base.num_layers)
                       if num_experts > 0 and i not in dense and (i + 1) % step == 0)
        top_k = int(cfg.num_experts_per_tok)
        if sparse and not 1 <= top_k <= num_experts:
            raise UnsupportedArchitectureError(f"the config routes each token to {top_k} of {num_experts} experts")
        block, parts = _MIXTRAL_NAMES if mixtral else _QWEN_NAMES
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", mixtral) else None
        max_positions = base.max_position_embeddings
        if window and window < max_positions:
            # Within the window, sliding attention equals full attention: serve that length exactly.
            max_positions = window
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaShape)}
        fields["max_position_embeddings"] = max_positions
        return cls(**fields, num_experts=num_experts, top_k=top_k,
                   moe_intermediate_size=int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size),
                   shared_expert_intermediate_size=int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0),
                   normalize_top_k=mixtral or bool(getattr(cfg, "norm_topk_prob", False)),
                   sparse_layers=sparse, hf_block=block, hf_expert_parts=parts)


class GroupedExperts(nn.Module):
    """Every expert's SiLU-gated MLP, stored grouped: gate_up_proj [E * 2I, H] (expert e's gate rows, then its
    up rows), down_proj [E * H, I]. forward runs each expert the step's tokens chose once, on their rows."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts * 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts * hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        gate_up, down = self.gate_up_proj.view(e, 2 * i, h), self.down_proj.view(e, h, i)
        groups = group_by_expert(experts, e)
        rows = x[groups.tokens]                         # every (token, slot) pair's input, grouped by expert
        out = torch.empty_like(rows)
        for expert, lo, hi in groups.spans:
            gate, up = F.linear(rows[lo:hi], gate_up[expert]).split(i, dim=-1)
            out[lo:hi] = F.linear(F.silu(gate) * up, down[expert])
        return combine(out, weights, groups)


class SparseMoeBlock(nn.Module):
    """Router (`gate`), routed experts, and Qwen2-MoE's shared expert scaled by sigmoid(shared_expert_gate)."""

    def __init__(self, shape: MoeShape):
        super().__init__()
        self.top_k, self.normalize = shape.top_k, shape.normalize_top_k
        self.gate = nn.Linear(shape.hidden_size, shape.num_experts, bias=False)
        self.experts = GroupedExperts(shape.num_experts, shape.hidden_size, shape.moe_intermediate_size)
        if shape.shared_expert_intermediate_size:
            self.shared_expert = MLP(dataclasses.replace(
                shape, intermediate_size=shape.shared_expert_intermediate_size))
            self.shared_expert_gate = nn.Linear(shape.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        # lora_slots: the dense MLP's signature; adapters are refused on these models (engine).
        weights, experts = route(self.gate(x), self.top_k, self.normalize)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """The Llama-family model whose `shape.sparse_layers` carry a SparseMoeBlock instead of the MLP."""

    def __init__(self, shape: MoeShape, rope: RotaryEmbedding):
        super().__init__(shape, rope)    # built on the meta device by the loader: the dense MLPs replaced cost nothing
        for i in shape.sparse_layers:
            self.layers[i].mlp = SparseMoeBlock(shape)

    def num_parameters(self) -> int:
        s: MoeShape = self.shape
        h = s.hidden_size
        sparse = (s.num_experts * (3 * h * s.moe_intermediate_size + h)
                  + (3 * h * s.shared_expert_intermediate_size + h if s.shared_expert_intermediate_size else 0))
        return super().num_parameters() + len(s.sparse_layers) * (sparse - 3 * h * s.intermediate_size)

    def expected_weight_names(self) -> set[str]:
        s: MoeShape = self.shape
        names = super().expected_weight_names()
        for i in s.sparse_layers:
            names -= {f"model.layers.{i}.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
            p = f"model.layers.{i}.{s.hf_block}."
            names.add(p + "gate.weight")
            names |= {f"{p}experts.{e}.{part}.weight" for e in range(s.num_experts) for part in s.hf_expert_parts}
            if s.shared_expert_intermediate_size:
                names |= {f"{p}shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
                names.add(p + "shared_expert_gate.weight")
        return names

    def hf_to_param(self, name: str) -> tuple[str, int | None]:
        """An expert's gate/up is part 2e/2e+1 of its layer's grouped gate_up_proj, its down part e of down_proj."""
        s: MoeShape = self.shape
        if m := _EXPERT.fullmatch(name):
            layer, expert, which = m.group(1), int(m.group(3)), s.hf_expert_parts.index(m.group(4))
            if which == 2:
                return f"layers.{layer}.mlp.experts.down_proj", expert
            return f"layers.{layer}.mlp.experts.gate_up_proj", 2 * expert + which
        if s.hf_block != "mlp":
            name = name.replace(f".{s.hf_block}.", ".mlp.")
        return super().hf_to_param(name)

    def fused_split(self, param_name: str) -> list[int]:
        s: MoeShape = self.shape
        if param_name.endswith("experts.gate_up_proj"):
            return [s.moe_intermediate_size] * (2 * s.num_experts)
        if param_name.endswith("experts.down_proj"):
            return [s.hidden_size] * s.num_experts
        if ".shared_expert." in param_name:
            return [s.shared_expert_intermediate_size] * 2
        return super().fused_split(param_name)


def has_experts(model: nn.Module) -> bool:
    """Whether any decoder layer of the model is a mixture of experts."""
    return any(isinstance(layer.mlp, SparseMoeBlock) for layer in getattr(model, "layers", ()))
