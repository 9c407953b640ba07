"""Trainable LoRA weights and the base model's forward through them, with autograd, for fine-tuning.

One sequence at a time, in chunks of tokens: a chunk attends to its own tokens causally and to the keys and
values of the chunks before it (no paged KV: training keeps them in the autograd graph). The base
weights are a frozen float copy of the served model's (kvloom/finetune/cotrainer.py loads it for the job);
only A and B of each target projection learn. The math is peft's: y = W x + scaling * B (A x), with A
initialised as peft does (Kaiming-uniform) and B at zero, so a new adapter starts as the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvloom.lora.adapter import TARGETS
from kvloom.lora.tables import part_shapes
from kvloom.models.rope import apply_rope

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TARGETS = tuple(TARGETS)        # every projection of every layer


class TrainableLora:
    """A [r, in] and B [out, r] per (layer, peft module name), as leaf tensors that require grad."""

    def __init__(self, model, rank: int, alpha: float, targets: tuple[str, ...], seed: int):
        self.rank, self.alpha, self.targets = rank, float(alpha), tuple(targets)
        self.scaling = self.alpha / rank
        shapes = part_shapes(model)
        gen = torch.Generator().manual_seed(seed)
        self.weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(model.shape.num_layers):
            for module in self.targets:
                fused, part = TARGETS[module]
                out_dim, in_dim = shapes[fused][part]
                # peft's init: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0.
                bound = 1.0 / math.sqrt(in_dim)
                a = (torch.rand(rank, in_dim, generator=gen) * 2 - 1) * bound
                self.weights[(layer, module)] = (a.requires_grad_(), torch.zeros(out_dim, rank, requires_grad=True))

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        pair = self.weights.get((layer, module))
        if pair is None:
            return None
        a, b = pair
        return (x @ a.t()) @ b.t() * self.scaling

    def lowest_layer(self) -> int:
        return min(layer for layer, _ in self.weights)


def _plus(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return y if delta is None else y + delta


def layer_forward(model, i: int, lora: TrainableLora, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None):
    """Decoder layer i of a kvloom Llama-family model over one chunk of a sequence: h [T, hidden] holds the
    chunk's tokens, past_k / past_v [P, kv heads, head dim] the keys and values of the P tokens before it.
    Returns (the chunk's output, its own keys, its own values), the keys rotated as attention reads them."""
    s = model.shape
    layer = model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    t = h.shape[0]
    x = layer.input_layernorm(h)
    q, k, v = F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias).split(
        [attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = _plus(q, lora.delta(i, "q_proj", x)).view(t, s.num_heads, s.head_dim)
    k = _plus(k, lora.delta(i, "k_proj", x)).view(t, s.num_kv_heads, s.head_dim)
    v = _plus(v, lora.delta(i, "v_proj", x)).view(t, s.num_kv_heads, s.head_dim)
    if s.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values, mask = k, v, None
    if past_k is not None and past_k.shape[0]:
        keys, values = torch.cat((past_k, k)), torch.cat((past_v, v))
        p = past_k.shape[0]   # the chunk's j-th token sees every earlier token and itself
        mask = torch.arange(p + t).unsqueeze(0) <= torch.arange(p, p + t).unsqueeze(1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                       attn_mask=mask, is_causal=mask is None, scale=attn.scale,
                                       enable_gqa=s.num_heads != s.num_kv_heads)
    o = o.transpose(0, 1).reshape(t, attn.q_size)
    h = h + _plus(F.linear(o, attn.o_proj.weight), lora.delta(i, "o_proj", o))
    x = layer.post_attention_layernorm(h)
    gate, up = F.linear(x, mlp.gate_up_proj.weight).split(mlp.intermediate_size, dim=-1)
    act = F.silu(_plus(gate, lora.delta(i, "gate_proj", x))) * _plus(up, lora.delta(i, "up_proj", x))
    return h + _plus(F.linear(act, mlp.down_proj.weight), lora.delta(i, "down_proj", act)), k, v


def head_loss(model, h: torch.Tensor, targets: torch.Tensor, denominator: int) -> torch.Tensor:
    """Summed cross-entropy of the rows' next tokens (-100: not trained on) over `denominator` tokens."""
    logits = F.linear(model.norm(h), model.lm_head.weight)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / denominator
