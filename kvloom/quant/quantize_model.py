"""Swap a loaded model's linear layers for quantized ones, in place."""
from __future__ import annotations

import logging

from torch import nn

from kvloom.config import QUANTIZATIONS
from kvloom.errors import KvloomError
from kvloom.models.gguf_weights import EMBEDDING
from kvloom.models.moe import has_experts
from kvloom.quant.block_embedding import BlockEmbedding
from kvloom.quant.int4_linear import Int4Linear
from kvloom.quant.q4_linear import Q4Linear
from kvloom.quant.smoothing import activation_absmax, smooth
from kvloom.quant.int8_linear import Int8Linear
from kvloom.quant.w8a8_linear import W8A8Linear

log = logging.getLogger(__name__)
SCHEMES = tuple(q for q in QUANTIZATIONS if q != "auto")   # "auto" is resolved by the engine first
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_up_proj": ("gate_proj", "up_proj"),
          "down_proj": ("down_proj",)}


def _quantized(linear: nn.Linear, scheme: str, group: int, native: bool = True) -> nn.Module:
    w, b = linear.weight.data, None if linear.bias is None else linear.bias.data
    if scheme == "int8":
        return Int8Linear(w, b, native)
    if scheme == "w8a8":
        return W8A8Linear(w, b, native)
    g = group if w.shape[1] % group == 0 else 32   # e.g. 576 inputs admit groups of 32 and 64, not 128
    if w.shape[1] % g:
        raise KvloomError(f"int4 needs in_features divisible by the group size; {w.shape[1]} is not")
    return Int4Linear.from_float(w, b, g, native)


def _from_gguf_blocks(model: nn.Module, index: int, where: str, fused: str, native: bool) -> nn.Module:
    """A projection on the file's own 4-bit blocks; w8a8 from its float weights when a part is of another
    type (Q4_K_M files keep some layers in Q6_K or Q8_0), so every layer has an integer kernel."""
    linear = getattr(getattr(model.layers[index], where), fused)
    names = [f"model.layers.{index}.{where}.{part}.weight" for part in _FUSED[fused]]
    parts = [model.gguf_blocks.get(name) for name in names]
    if all(p is not None for p in parts):
        bias = None if linear.bias is None else linear.bias.data
        return Q4Linear.from_gguf_parts(parts, linear.in_features, bias, native)
    return _quantized(linear, "w8a8", 32, native)


def quantize_model(model: nn.Module, scheme: str, group: int = 32, run_calibration=None,
                   native_kernels: bool = True) -> nn.Module:
    """Quantize every projection of the decoder layers, and the LM head.

    The LM head goes to int8 under every scheme: it is a large share of the
    bytes a decode step reads (49k x 576 for SmolLM2), and int4 costs it
    quality where the layers are less sensitive. A tied embedding keeps its
    float table for lookups (only one row a token is read). gguf multiplies the
    GGUF's own 4-bit blocks (load_model(keep_gguf_blocks=True)) by int8
    activations, the head in w8a8, and looks tokens up in the file's own
    embedding blocks (block_embedding.py). For w8a8,
    run_calibration (one forward pass over sample text) lets SmoothQuant-style
    smoothing move activation outliers into the weights first.
    """
    if scheme not in SCHEMES:
        raise KvloomError(f"quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "none":
        return model
    if has_experts(model):   # the quantized linears, smoothing and GGUF blocks cover dense MLPs only
        raise KvloomError(f"quantization {scheme} does not cover mixture-of-experts weights yet; serve this "
                          "model with quantization none (the default for safetensors)")
    if scheme == "gguf":
        if not getattr(model, "gguf_deferred", None):
            raise KvloomError("quantization gguf multiplies a GGUF's 4-bit blocks; this model has none "
                              "(not a GGUF file, or no Q4_0/Q4_1/Q4_K projection in it)")
        for i, layer in enumerate(model.layers):
            for where, fused in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                                 ("mlp", "down_proj")):
                setattr(getattr(layer, where), fused, _from_gguf_blocks(model, i, where, fused, native_kernels))
        table = model.gguf_blocks.get(EMBEDDING)
        if table is not None:
            model.embed_tokens = BlockEmbedding(*table, dtype=model.norm.weight.dtype, native=native_kernels)
        if model.lm_head.weight.is_meta:   # tied to the table in blocks: quantized from it a slice at a time
            model.lm_head = W8A8Linear(model.embed_tokens.float_rows(), None, native_kernels)
        else:
            model.lm_head = _quantized(model.lm_head, "w8a8", group, native_kernels)
        model.lm_head.pack_row_groups()   # its batch-1 GEMV on the grouped loop
        model.gguf_blocks, model.gguf_deferred = {}, {}   # repacked: the raw copies go
        return model
    if scheme == "w8a8" and run_calibration is not None:
        smooth(model, activation_absmax(model, run_calibration))
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _quantized(attn.qkv_proj, scheme, group, native_kernels)
        attn.o_proj = _quantized(attn.o_proj, scheme, group, native_kernels)
        mlp.gate_up_proj = _quantized(mlp.gate_up_proj, scheme, group, native_kernels)
        mlp.down_proj = _quantized(mlp.down_proj, scheme, group, native_kernels)
    model.lm_head = _quantized(model.lm_head, "w8a8" if scheme == "w8a8" else "int8", group, native_kernels)
    if isinstance(model.lm_head, W8A8Linear):
        model.lm_head.pack_row_groups()   # its batch-1 GEMV on the grouped loop
    return model
