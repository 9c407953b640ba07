"""The Llama family in plain PyTorch: Llama, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Weights keep Hugging Face names, except that q/k/v and gate/up are fused at
load time into one matmul each (fewer, larger ops).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.kernels import kernels
from kvloom.attention.backend import paged_attention
from kvloom.attention.metadata import AttentionMetadata
from kvloom.lora.tables import lora_add
from kvloom.models.rope import RotaryEmbedding, apply_rope


@dataclass(frozen=True)
class LlamaShape:
    """The numbers a Llama-family model is built from, read off a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg, *, qkv_bias: bool = False, qk_norm: bool = False) -> LlamaShape:
        heads = cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            qkv_bias=qkv_bias or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=qk_norm,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False   # set by use_native_ops: the native decode stack's own norm, so both paths agree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype == torch.float32 and x.dim() in (2, 3) and x.stride(-1) == 1:
            return kernels().rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:   # one fused op, bit-identical to the reference's arithmetic in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # The reference's order for lower precisions: normalise in fp32, scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.shape = shape
        self.q_size = shape.num_heads * shape.head_dim
        self.kv_size = shape.num_kv_heads * shape.head_dim
        self.scale = shape.head_dim ** -0.5
        self.qkv_proj = nn.Linear(shape.hidden_size, self.q_size + 2 * self.kv_size, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, shape.hidden_size, bias=False)
        if shape.qk_norm:
            self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
            self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
        self.lora = None   # LoRA slot tables of qkv and o, when adapters are served (kvloom/lora/tables.py)
        self.sliding = False   # a sliding-window layer (Gemma 3's local layers) sees only the window's keys
        self.kv_group = 0      # where its KV pages are named (AttentionMetadata.for_group), when grouped

    def forward(self, x, rope_cos_sin, meta: AttentionMetadata, kv_cache):
        t = x.shape[0]
        s = self.shape
        h, kvh = s.num_heads, s.num_kv_heads
        lora = self.lora is not None and meta.lora_slots is not None
        qkv = self.qkv_proj(x)
        if lora:
            lora_add(x, qkv, self.lora["qkv"], meta.lora_slots)
        qkv = qkv.view(t, h + 2 * kvh, s.head_dim)
        if s.qk_norm:
            qk = torch.cat((self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h:h + kvh])), dim=1)
        else:
            qk = qkv[:, :h + kvh]
        qk = apply_rope(qk, *rope_cos_sin)           # q and k rotated together: one set of ops
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh:]
        kv_meta = meta.for_group(self.kv_group)
        kv_cache.write(k, v, kv_meta)
        o = paged_attention(q, kv_cache, kv_meta, self.scale, self.sliding).reshape(t, self.q_size)
        out = self.o_proj(o)
        if lora:
            lora_add(o, out, self.lora["o"], meta.lora_slots)
        return out


class MLP(nn.Module):
    """act(gate) * up, then down; act is SiLU (Llama) or tanh-approximated GELU (Gemma)."""

    def __init__(self, shape: LlamaShape, gelu_tanh: bool = False):
        super().__init__()
        self.intermediate_size = shape.intermediate_size
        self.gelu_tanh = gelu_tanh
        self.gate_up_proj = nn.Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)
        self.native = False   # set by use_native_ops, as RMSNorm's
        self.lora = None      # LoRA slot tables of gate_up and down, when adapters are served

    def forward(self, x, lora_slots: torch.Tensor | None = None):
        lora = self.lora is not None and lora_slots is not None
        gate_up = self.gate_up_proj(x)
        if lora:
            lora_add(x, gate_up, self.lora["gate_up"], lora_slots)
        if self.gelu_tanh:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = F.gelu(gate, approximate="tanh") * up
        elif self.native and gate_up.dtype == torch.float32 and gate_up.dim() == 2:
            act = kernels().silu_mul(gate_up.contiguous())
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = F.silu(gate) * up
        out = self.down_proj(act)
        if lora:
            lora_add(act, out, self.lora["down"], lora_slots)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    @property
    def norm_before_mlp(self) -> RMSNorm:
        """The norm whose output the MLP reads (smoothing folds its factors into it)."""
        return self.post_attention_layernorm

    def forward(self, h, rope_cos_sin, meta, kv_cache):
        h = h + self.self_attn(self.input_layernorm(h), rope_cos_sin, meta, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h), meta.lora_slots)


class LlamaForCausalLM(nn.Module):
    """forward(flat token ids, positions, attention metadata, KV pool) -> logits of the sampled rows."""

    # HF name fragment -> (fused parameter, index of its part)
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, shape: LlamaShape, rope: RotaryEmbedding):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.rope = rope
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, logits_indices):
        h = self.embed_tokens(input_ids)
        if meta.rows is not None:   # the decode-stack backend: every layer in one native call
            h = meta.backend.run_layers(h, *self.rope.rows(positions), meta)
        else:
            rope_cos_sin = self.rope.cos_sin(positions, h.dtype)
            for layer, kv in zip(self.layers, kv_caches):
                h = layer(h, rope_cos_sin, meta, kv)
        return self.lm_head(self.norm(h[logits_indices]))

    def build_rope(self, hf_config, max_positions: int) -> None:
        self.rope = RotaryEmbedding(hf_config, self.shape.head_dim, max_positions)

    def convert_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor (under its HF name) as this model's parameter holds it."""
        return tensor

    def use_native_ops(self) -> None:
        """RMSNorm and SiLU * up through the native kernels (CPU, float32), as the native decode stack
        computes them: a decode row then gets the same bits whichever path its step takes."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP)):
                m.native = True

    def num_parameters(self) -> int:
        """Logical parameter count (a tied head counted once), whether or not layers are quantized."""
        s = self.shape
        per_layer = (s.hidden_size * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim        # q, k, v
                     + s.num_heads * s.head_dim * s.hidden_size                              # o
                     + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size          # mlp, norms
                     + s.qkv_bias * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim + s.qk_norm * 2 * s.head_dim)
        head = 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size
        return s.num_layers * per_layer + s.vocab_size * s.hidden_size + head + s.hidden_size

    def expected_weight_names(self) -> set[str]:
        """The Hugging Face parameter names this model needs."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.shape.tie_word_embeddings:
            names.add("lm_head.weight")
        parts = ["q_proj", "k_proj", "v_proj", "o_proj"]
        for i in range(self.shape.num_layers):
            p = f"model.layers.{i}."
            names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
            names |= {f"{p}self_attn.{n}.weight" for n in parts}
            names |= {f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
            if self.shape.qkv_bias:
                names |= {f"{p}self_attn.{n}.bias" for n in parts[:3]}
            if self.shape.qk_norm:
                names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        return names

    def hf_to_param(self, name: str) -> tuple[str, int | None]:
        """Map an HF weight name to (our parameter name, part index within a fused weight or None)."""
        name = name.removeprefix("model.")
        for frag, (fused, idx) in self._FUSED.items():
            if f".{frag}." in name:
                return name.replace(frag, fused), idx
        return name, None

    def fused_split(self, param_name: str) -> list[int]:
        """Row sizes of the parts of a fused parameter."""
        s = self.shape
        if "qkv_proj" in param_name:
            return [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
        return [s.intermediate_size, s.intermediate_size]
