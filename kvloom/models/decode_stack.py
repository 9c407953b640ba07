"""The decoder layers of a step of decodes (and short draft trees) as one native call
(kvloom/kernels/decode_stack.cpp).

A batch-1 decode step is mostly overhead in eager PyTorch: ~20 small ops per
layer around four matrix-vector products. The native stack runs the same
computation from C++ over the same weights and KV pool, so the model only
embeds, computes the RoPE tables, and takes the head. Built once the weights
are final (after quantization); None where it does not apply: no native
kernels, a non-float32 or non-CPU model, an int8 KV pool, or linear layers
other than float and w8a8 (the module path then runs every step).
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import kernels
from kvloom.kv.kv_cache import FloatKVCache
from kvloom.models.llama import LlamaForCausalLM
from kvloom.quant.w8a8_linear import W8A8Linear

# Draft-carrying chunks up to this many tokens run in the stack with the decodes, each token as a decode
# row over its own prefix; longer ones take the module path, whose attention reads a chunk's context once
# for all its tokens. Prompt chunks always take the module path: how a prompt is split into chunks
# depends on what else is scheduled, and its K/V must not depend on that.
STACK_MAX_CHUNK = 16


def _linear_parts(linear: nn.Module) -> list[torch.Tensor | None] | None:
    """(weight [out, in], per-channel scales or None, bias or None), or None for a kind the stack cannot run."""
    if isinstance(linear, W8A8Linear) and linear.native:
        return [linear.weight, linear.scales, linear.bias]
    if type(linear) is nn.Linear:
        return [linear.weight.detach(), None, None if linear.bias is None else linear.bias.detach()]
    return None


def build_decode_stack(model: LlamaForCausalLM, kv) -> object | None:
    native = kernels()
    weight = model.embed_tokens.weight
    if native is None or not isinstance(kv, FloatKVCache) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    s = model.shape
    stack = native.DecodeStack(s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.rms_norm_eps,
                               s.head_dim ** -0.5)
    for layer, layer_kv in zip(model.layers, kv.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear_parts(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(parts is None for parts in linears):
            return None
        norms = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach()) if s.qk_norm else (None, None)
        stack.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        *norms, *linears, layer_kv.k, layer_kv.v)
    return stack
