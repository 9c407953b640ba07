"""The decoder layers of a step of decodes (and short draft trees) as one native call
(kvloom/kernels/decode_stack.cpp).

A batch-1 decode step is mostly overhead in eager PyTorch: ~20 small ops per
layer around four matrix-vector products. The native stack runs the same
computation from C++ over the same weights and KV pool, so the model only
embeds, computes the RoPE tables, and takes the head. Built once the weights
are final (after quantization); None where it does not apply: no native
kernels, a non-float32 or non-CPU model, or linear layers other than float,
w8a8, 4-bit GGUF blocks and the weight-only modes' native panels, or
mixture-of-experts layers (the module path then runs every step). Over an
int8 KV pool it writes keys to the float staging and values quantized per row,
as the module path does, and runs plain decodes (draft trees take the modules).
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import kernels
from kvloom.kv.int8_kv_cache import Int8KVCache
from kvloom.kv.kv_cache import FloatKVCache
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.moe import has_experts
from kvloom.quant.int4_linear import Int4Linear
from kvloom.quant.int8_linear import Int8Linear
from kvloom.quant.q4_linear import Q4Linear
from kvloom.quant.w8a8_linear import W8A8Linear

def _linear_parts(linear: nn.Module) -> list[torch.Tensor | None] | None:
    """(weight [out, in], per-channel scales or None, bias or None), or None for a kind the stack cannot run.
    4-bit layers give (blocks uint8, their scales, bias): the stack knows each one's outputs. The weight-only
    layers give their panels (int8 [P, in, 16] or 4-bit [P, in, 8]); 4-bit ones their offsets fourth."""
    if isinstance(linear, Q4Linear) and linear.native:
        return [linear.qs, linear.scales, linear.bias]
    if isinstance(linear, W8A8Linear) and linear.native:
        return [linear.weight, linear.scales, linear.bias]
    if isinstance(linear, Int8Linear) and linear.native:   # weight panels: the stack tells them by their shape
        return [linear.weight_int8, linear.scales, linear.bias]
    if isinstance(linear, Int4Linear) and linear.native:
        return [linear.weight_int4, linear.scales, linear.bias, linear.offsets]
    if type(linear) is nn.Linear:
        return [linear.weight.detach(), None, None if linear.bias is None else linear.bias.detach()]
    return None


def build_decode_stack(model: LlamaForCausalLM, kv) -> tuple[object | None, str | None]:
    """(the stack, None), or (None, why it does not apply)."""
    native = kernels()
    weight = model.norm.weight   # the model's float type
    if native is None:
        return None, "native kernels are off"
    if not isinstance(kv, (FloatKVCache, Int8KVCache)):
        return None, f"the stack reads float and int8 KV pools, not {type(kv).__name__}"
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None, f"the stack runs float32 on the CPU ({weight.dtype}, {weight.device})"
    if has_experts(model):
        return None, "the stack runs dense MLP layers; the mixture-of-experts layers take the module path"
    s = model.shape
    stack = native.DecodeStack(s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.rms_norm_eps,
                               s.head_dim ** -0.5)
    for layer, layer_kv in zip(model.layers, kv.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear_parts(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(parts is None for parts in linears):
            return None, "the stack runs float, w8a8, gguf 4-bit and native weight-only linear layers"
        norms = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach()) if s.qk_norm else (None, None)
        stack.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        *norms, *linears, layer_kv.k, layer_kv.v)
    return stack, None
