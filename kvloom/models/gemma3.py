"""Gemma 3 (text) in plain PyTorch, on the Llama family's attention, MLP and norm modules.

What differs from Llama: the embedding is scaled by sqrt(hidden); every norm
multiplies by (1 + w), kept here as one stored multiplier so the shared RMSNorm
(and w8a8 smoothing, which divides norm weights) work unchanged; each layer has
four norms (before and after attention, before and after the MLP); q and k are
RMS-normed per head; the query scale is query_pre_attn_scalar^-0.5; the MLP is
gelu_tanh(gate) * up; and layers alternate between sliding-window ("local")
attention with its own RoPE base and global attention (every sixth layer in
the released models, as the config's layer_types say). Logits may be
soft-capped (final_logit_softcapping).

The sliding window is applied by the attention backend (attention/backend.py):
the native paged-attention kernel takes it over a float pool (each token a row
that reads only its window), the torch backend masks it over an int8 pool. The
decode stack runs Llama-family layers only, so every Gemma 3 step takes the
module path, and the runner says so in /server_info. The KV behind a request's
window is released (kv/window_pages.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from kvloom.attention.metadata import AttentionMetadata
from kvloom.errors import UnsupportedArchitectureError
from kvloom.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, LlamaShape, RMSNorm
from kvloom.models.rope import RotaryEmbedding

_ACTIVATIONS = ("gelu_pytorch_tanh",)
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class Gemma3Shape(LlamaShape):
    sliding_window: int
    sliding_layers: tuple[bool, ...]          # per layer: local (sliding-window) attention
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None

    @classmethod
    def from_hf(cls, cfg, **_) -> Gemma3Shape:
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        if act not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(f"Gemma 3 with activation {act!r} is not supported; "
                                               f"supported: {', '.join(_ACTIVATIONS)}")
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise UnsupportedArchitectureError("Gemma 3 with attention logit soft-capping is not supported")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError("Gemma 3 with bidirectional attention (an encoder) is not supported")
        types = list(cfg.layer_types)
        if len(types) != cfg.num_hidden_layers or any(t not in _LAYER_TYPES for t in types):
            raise UnsupportedArchitectureError(f"Gemma 3 layer_types must name {cfg.num_hidden_layers} layers, each "
                                               f"one of {', '.join(_LAYER_TYPES)}; got {types}")
        window = cfg.sliding_window
        if "sliding_attention" in types and (not isinstance(window, int) or window < 1):
            raise UnsupportedArchitectureError(f"Gemma 3 sliding_window must be a positive integer, got {window!r}")
        base = LlamaShape.from_hf(cfg, qk_norm=True)
        return cls(**dataclasses.asdict(base), sliding_window=window,
                   sliding_layers=tuple(t == "sliding_attention" for t in types),
                   query_pre_attn_scalar=float(cfg.query_pre_attn_scalar),
                   final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None))


class Gemma3DecoderLayer(DecoderLayer):
    """Norms on both sides of attention and of the MLP ("sandwich" norms)."""

    def __init__(self, shape: Gemma3Shape, sliding: bool):
        nn.Module.__init__(self)
        eps = shape.rms_norm_eps
        self.input_layernorm = RMSNorm(shape.hidden_size, eps)
        self.self_attn = Attention(shape)
        self.self_attn.scale = shape.query_pre_attn_scalar ** -0.5
        self.self_attn.sliding = sliding
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(shape.hidden_size, eps)
        self.mlp = MLP(shape, gelu_tanh=True)
        self.post_feedforward_layernorm = RMSNorm(shape.hidden_size, eps)

    @property
    def norm_before_mlp(self) -> RMSNorm:
        return self.pre_feedforward_layernorm

    def forward(self, h, rope_cos_sin, meta, kv_cache):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope_cos_sin, meta, kv_cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), meta.lora_slots))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """forward(flat token ids, positions, attention metadata, KV pool) -> logits of the sampled rows."""

    shape_class = Gemma3Shape

    def __init__(self, shape: Gemma3Shape, rope: RotaryEmbedding | None):
        nn.Module.__init__(self)
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.rope = rope                 # the global layers' RoPE; the local ones' is local_rope
        self.local_rope = None
        self.layers = nn.ModuleList(Gemma3DecoderLayer(shape, sliding) for sliding in shape.sliding_layers)
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def build_rope(self, hf_config, max_positions: int) -> None:
        d = self.shape.head_dim
        self.rope = RotaryEmbedding(hf_config, d, max_positions, layer_type="full_attention")
        self.local_rope = (RotaryEmbedding(hf_config, d, max_positions, layer_type="sliding_attention")
                           if any(self.shape.sliding_layers) else None)

    def convert_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Checkpoints store w, the norms multiply by (1 + w): computed once, in the reference's fp32 arithmetic.
        return 1.0 + tensor.float() if name.endswith("norm.weight") else tensor

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, logits_indices):
        if meta.rows is not None:
            raise RuntimeError("Gemma 3 runs on the module path; the decode stack runs Llama-family layers only")
        h = self.embed_tokens(input_ids)
        h = h * torch.tensor(self.shape.hidden_size ** 0.5, dtype=h.dtype)
        global_cs = self.rope.cos_sin(positions, h.dtype)
        local_cs = self.local_rope.cos_sin(positions, h.dtype) if self.local_rope is not None else None
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, local_cs if layer.self_attn.sliding else global_cs, meta, kv)
        logits = self.lm_head(self.norm(h[logits_indices]))
        cap = self.shape.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def use_native_ops(self) -> None:
        """Nothing to switch: the native norm and SiLU kernels exist to agree with the decode stack, which
        Gemma 3 does not run on; its modules keep the reference's arithmetic."""

    def num_parameters(self) -> int:
        return super().num_parameters() + 2 * self.shape.num_layers * self.shape.hidden_size   # the two extra norms

    def expected_weight_names(self) -> set[str]:
        names = super().expected_weight_names()
        for i in range(self.shape.num_layers):
            names |= {f"model.layers.{i}.pre_feedforward_layernorm.weight",
                      f"model.layers.{i}.post_feedforward_layernorm.weight"}
        return names
