"""Rotary position embedding: a cos/sin table indexed by position.

The inverse frequencies (and any scaling: linear, llama3, yarn, ...) come from
transformers' own RoPE init functions, so every variant a config names is
computed exactly as the reference computes it.
"""
from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvloom.errors import UnsupportedArchitectureError


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """The RoPE settings of a config; with layer_type, those of one kind of layer (Gemma 3 keeps one set for
    its sliding-window layers and one for its global ones)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        if layer_type not in params:
            raise UnsupportedArchitectureError(f"the config has no RoPE settings for {layer_type!r} layers")
        params = params[layer_type]
    if not params:  # older configs
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to q and k ([T, heads, head_dim]) at given positions."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, layer_type: str | None = None):
        super().__init__()
        params = rope_parameters(hf_config, layer_type)
        rope_type = params["rope_type"]
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        elif rope_type in ("dynamic", "longrope"):
            raise UnsupportedArchitectureError(
                f"RoPE type {rope_type!r} changes with sequence length and is not supported yet; "
                "supported: default, linear, llama3, yarn")
        elif rope_type in ROPE_INIT_FUNCTIONS:
            kwargs = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
        else:
            raise UnsupportedArchitectureError(f"unknown RoPE type {rope_type!r}")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        # Plain attributes, not buffers: built once in fp32, untouched by to_empty() / .to(dtype).
        self.cos = emb.cos() * scaling
        # The sine with its first half negated, so that rotate-half becomes a roll (see apply_rope): once here,
        # not in every step's lookup.
        sin, half = emb.sin() * scaling, head_dim // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] tables for this step's positions: looked up once per step, used by every layer.
        The sine's first half is negated, so rotate-half becomes a roll (see apply_rope)."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.signed_sin[positions].to(dtype).unsqueeze(1)

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as float32 [T, D] rows, for the native decode stack: two lookups, nothing else a step."""
        return self.cos[positions], self.signed_sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) = roll(x) * sign."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
