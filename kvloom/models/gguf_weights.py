"""GGUF tensors under Hugging Face names, dequantised to fp32 (read with the `gguf` package).

llama.cpp's converter permutes the rows of Llama's q/k weights for its RoPE
layout; that is undone here so the weights match the Hugging Face ones. The
same row order is restored on the raw blocks kept for the 4-bit path. Gemma's
converter stores its norms as (1 + w), the multiplier they apply; they are
handed on as Hugging Face's w, as transformers reads them.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from kvloom.errors import WeightsError
from kvloom.models.weight_file_checks import check_gguf
from kvloom.quant.q4_linear import GGUF_TYPES

_LAYER_PARTS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma's layers have four norms: the GGUF's ffn_norm is the one before the MLP, not after attention.
_ARCH_LAYER_PARTS = {
    "gemma3": {**_LAYER_PARTS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
_PLUS_ONE_NORM_ARCHS = {"gemma3"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = {"rope_freqs"}  # RoPE scaling factors: the config carries them
_PERMUTED_ARCHS = {"llama"}
FLOAT_TYPES = {"F32", "F16", "BF16"}   # tensor types stored as floats, not blocks
EMBEDDING = "model.embed_tokens.weight"
PROJECTION_SUFFIXES = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"))


def open_gguf(path: str) -> GGUFReader:
    check_gguf(path)  # GGUFReader trusts the header's counts: a lying one never finishes
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a short or corrupt file
        raise WeightsError(f"cannot read GGUF file {path}: {e} (truncated or not a GGUF file?)") from e


def projection_types(reader: GGUFReader) -> set[str]:
    """The tensor types of the decoder layers' projection weights (Q4_1, Q8_0, F16, ...)."""
    arch = gguf_architecture(reader)
    return {t.tensor_type.name for t in reader.tensors
            if (hf_name(t.name, arch) or "").endswith(PROJECTION_SUFFIXES)}


def gguf_architecture(reader: GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None and field.types == [GGUFValueType.STRING] else "unknown"


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """token_embd.weight -> model.embed_tokens.weight; blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m:
        part = _ARCH_LAYER_PARTS.get(arch, _LAYER_PARTS).get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{suffix}" if part else None
    if base in _SKIPPED:
        return None
    return f"{_GLOBAL[base]}.{suffix}" if base in _GLOBAL else None


def _model_name(t, path: str, arch: str) -> str | None:
    """The HF name a GGUF tensor loads under; None for tensors the model does not load."""
    name = hf_name(t.name, arch)
    if name is None and t.name.split(".")[0] not in _SKIPPED:
        raise WeightsError(f"{path}: GGUF tensor {t.name!r} has no place in this model")
    return name


def gguf_shapes(reader: GGUFReader) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, shape as dequantised) of every tensor the model loads, from the header alone."""
    path = getattr(reader.data, "filename", None) or "GGUF file"
    arch = gguf_architecture(reader)
    for t in reader.tensors:
        if (name := _model_name(t, path, arch)) is not None:
            yield name, tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dimensions fastest first


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def block_projection_names(reader: GGUFReader) -> set[str]:
    """HF names of the decoder layers' projection weights stored in 4-bit blocks (q4_linear.GGUF_TYPES)."""
    arch = gguf_architecture(reader)
    return {name for t in reader.tensors if t.tensor_type.name in GGUF_TYPES
            and (name := hf_name(t.name, arch) or "").endswith(PROJECTION_SUFFIXES)}


def embedding_in_blocks(reader: GGUFReader) -> bool:
    """Whether the embedding table is stored quantized (Q8_0, Q6_K, ...), not as floats."""
    return any(t.name == "token_embd.weight" and t.tensor_type.name not in FLOAT_TYPES for t in reader.tensors)


def _raw_rows(t, heads: int, permute: bool) -> np.ndarray:
    """A tensor's rows of raw block bytes [out, bytes a row] uint8, in Hugging Face row order."""
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
    return (_unpermute(raw, heads) if permute and heads else raw).numpy()


def iter_gguf_weights(reader: GGUFReader, num_heads: int, num_kv_heads: int,
                      raw_blocks: dict[str, tuple[np.ndarray, str]] | None = None,
                      blocks_only: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, fp32 tensor) for every tensor. The tensors named in blocks_only are kept in
    raw_blocks as the file has them (name -> (rows of raw block bytes [out, bytes] uint8, type name), for
    kvloom/quant/q4_linear.py and block_embedding.py), never dequantised: they are yielded as their shape
    alone."""
    arch = gguf_architecture(reader)
    permute = arch in _PERMUTED_ARCHS
    path = getattr(reader.data, "filename", None) or "GGUF file"  # the reader's memmap knows its file
    for t in reader.tensors:
        name = _model_name(t, path, arch)
        if name is None:
            continue
        heads = num_heads if name.endswith("q_proj.weight") else num_kv_heads if name.endswith("k_proj.weight") else 0
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # ggml lists dimensions fastest first
        if permute and heads and (len(shape) == 0 or shape[0] % (2 * heads)):
            raise WeightsError(f"{path}: GGUF tensor {t.name} has shape {shape}, not rows for "
                               f"{heads} heads; the file does not match the config")
        if name in blocks_only:
            raw_blocks[name] = (_raw_rows(t, heads, permute), t.tensor_type.name)
            yield name, SimpleNamespace(shape=shape)
            continue
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise WeightsError(f"{path}: cannot dequantise GGUF tensor {t.name} ({t.tensor_type.name}): {e}") from e
        # Float tensors come back as views of the file's memory map: those are copied. A dequantised one is
        # already a new array (of the Q8_0 embedding, 1 GB at Llama-3.2-1B): no second copy of it.
        fresh = t.tensor_type.name not in FLOAT_TYPES and arr.dtype == np.float32 and arr.flags.writeable
        w = torch.from_numpy(arr if fresh else np.array(arr, dtype=np.float32, copy=True))
        if permute and heads:
            w = _unpermute(w, heads)
        if arch in _PLUS_ONE_NORM_ARCHS and name.endswith("norm.weight"):
            w = w - 1
        yield name, w
