"""Build a model from a ModelSource: config, architecture, weights, checks."""
from __future__ import annotations

import logging
import re
import sys
from types import SimpleNamespace

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tqdm import tqdm
from transformers import AutoConfig

from kvloom.errors import ModelNotFoundError, UnsupportedArchitectureError, WeightsError
from kvloom.models.gguf_metadata_cache import converted_dir
from kvloom.models.gguf_weights import (EMBEDDING, PROJECTION_SUFFIXES, block_projection_names,
                                        embedding_in_blocks, gguf_shapes, iter_gguf_weights, open_gguf,
                                        projection_types)
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.model_source import ModelSource
from kvloom.models.moe import MoeForCausalLM
from kvloom.models.registry import shape_for
from kvloom.models.safetensors_weights import iter_safetensors_weights, safetensors_shapes

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
MAX_POSITIONS = 1 << 22  # 4M: four times the longest context of the families kvloom serves (Qwen2.5-1M)


def load_hf_config(source: ModelSource):
    where = source.gguf_path or source.directory
    try:
        if source.gguf_file:
            converted = converted_dir(source)
            if converted is not None:
                return AutoConfig.from_pretrained(converted, trust_remote_code=False)
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file, trust_remote_code=False)
        # trust_remote_code=False: never run a model directory's Python (no interactive prompt either)
        return AutoConfig.from_pretrained(source.directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e)
        if ("does not recognize this architecture" in msg or "not supported" in msg or "custom code" in msg
                or (isinstance(e, KeyError) and not source.gguf_file)):  # a config.json's unknown model_type
            raise UnsupportedArchitectureError(f"cannot build a config for {where}: {msg}") from e
        if source.gguf_file:  # a missing or malformed metadata value
            raise WeightsError(f"cannot read the metadata of GGUF file {where}: {type(e).__name__}: {msg}") from e
        raise ModelNotFoundError(f"cannot read the config of {where}: {msg}") from e
    except Exception as e:  # transformers' GGUF conversion trips on malformed metadata in assorted ways
        if not source.gguf_file:
            raise
        raise WeightsError(f"cannot read the metadata of GGUF file {where}: {type(e).__name__}: {e}") from e


def load_model(source: ModelSource, dtype: torch.dtype, max_positions: int | None = None,
               keep_gguf_blocks: bool = False) -> tuple[LlamaForCausalLM, object]:
    """Returns (model in eval mode with all weights loaded, its transformers config). keep_gguf_blocks: a
    GGUF's 4-bit projection blocks stay on model.gguf_blocks (name -> (raw rows, type)) for the 4-bit path,
    and so does a quantized embedding table. Those are never dequantised here: a projection whose every part
    is in 4-bit blocks, and the table, keep their float weights on the meta device (model.gguf_deferred
    lists them) until the 4-bit path replaces them, or materialize_deferred() makes them if another path is
    chosen."""
    where = source.gguf_path or source.directory  # errors name the file
    # The GGUF's header is checked (open_gguf) before transformers parses its metadata for the config.
    reader = open_gguf(source.gguf_path) if source.gguf_file else None
    hf_config = load_hf_config(source)
    if reader is not None:
        # GGUF drops output.weight when the head is tied to the embedding.
        hf_config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    cls, shape = shape_for(hf_config)
    if reader is not None and issubclass(cls, MoeForCausalLM):   # GGUF's merged expert tensors are not mapped
        raise UnsupportedArchitectureError(f"{where}: mixture-of-experts models load from safetensors only (not "
                                           "GGUF) for now")
    max_positions = min(max_positions or shape.max_position_embeddings, shape.max_position_embeddings)
    if max_positions > MAX_POSITIONS:  # the RoPE tables below are built for every position
        raise UnsupportedArchitectureError(
            f"{where}: the config claims a context of {max_positions} positions, beyond kvloom's {MAX_POSITIONS} "
            "(a corrupt header?); set max_model_len to serve a shorter context")
    # Everything the config sizes is checked against the file's tensor table (headers only) before it is
    # allocated: a header that lies about a dimension is refused, not allocated.
    file_shapes = list(gguf_shapes(reader) if reader is not None else safetensors_shapes(source.directory))
    layers_in_file = {m.group(1) for name, _ in file_shapes if (m := _LAYER.match(name))}
    if shape.num_layers > len(layers_in_file):
        raise WeightsError(f"{where}: the config claims {shape.num_layers} layers, the file has weights for "
                           f"{len(layers_in_file)}")
    with torch.device("meta"):  # no time spent on random init: every weight is loaded below
        model = cls(shape, None)
    _load_weights(model, ((name, SimpleNamespace(shape=s)) for name, s in file_shapes), where)  # shapes only
    model.build_rope(hf_config, max_positions)
    keep = keep_gguf_blocks and reader is not None
    deferred = _deferred_projections(model, block_projection_names(reader)) if keep else {}
    if keep and embedding_in_blocks(reader):
        deferred[model.hf_to_param(EMBEDDING)[0]] = [EMBEDDING]
    _allocate_except(model, deferred)
    if shape.tie_word_embeddings:  # to_empty() gives the two names separate storage
        model.lm_head.weight = model.embed_tokens.weight
    raw_blocks: dict | None = {} if keep else None
    blocks_only = frozenset(name for names in deferred.values() for name in names)
    weights = (iter_gguf_weights(reader, shape.num_heads, shape.num_kv_heads, raw_blocks, blocks_only)
               if reader is not None else iter_safetensors_weights(source.directory))
    total = len(reader.tensors) if reader is not None else None
    bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", disable=not sys.stderr.isatty(),
               leave=False)
    _load_weights(model, bar, where)
    model = model.to(dtype).eval().requires_grad_(False)
    model.gguf_blocks = raw_blocks or {}
    model.gguf_deferred = deferred
    model.gguf_projection_types = projection_types(reader) if reader is not None else set()
    return model, hf_config


def _deferred_projections(model: LlamaForCausalLM, block_names: set[str]) -> dict[str, list[str]]:
    """Fused projection parameter -> the HF names of its parts, for those whose every part is in 4-bit blocks
    (a part of another type, as Q4_K_M files have, needs the float weights of all parts)."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for name in model.expected_weight_names():
        if name.endswith(PROJECTION_SUFFIXES):
            param, index = model.hf_to_param(name)
            parts.setdefault(param, []).append((index or 0, name))
    return {param: [name for _, name in sorted(named)] for param, named in parts.items()
            if all(name in block_names for _, name in named)}


def _replace_parameter(model: LlamaForCausalLM, old: torch.nn.Parameter, new: torch.nn.Parameter | None) -> list:
    """Every (module, attribute) holding old (a tied embedding is held by the LM head too) -> new; None
    removes the attribute. Returns the places."""
    places = [(m, attr) for m in model.modules() for attr, p in m._parameters.items() if p is old]
    for module, attr in places:
        if new is None:
            del module._parameters[attr]
        else:
            module._parameters[attr] = new
    return places


def _allocate_except(model: LlamaForCausalLM, deferred: dict[str, list[str]]) -> None:
    """model.to_empty() for every parameter but the deferred ones, which stay on the meta device."""
    held = []
    for param_name in deferred:
        param = model.get_parameter(param_name)
        held.append((param, _replace_parameter(model, param, None)))
    model.to_empty(device="cpu")
    for param, places in held:
        for module, attr in places:
            module._parameters[attr] = param


def materialize_deferred(model: LlamaForCausalLM) -> None:
    """Dequantise the deferred weights (load_model) into float ones, for a path other than 4-bit."""
    for param_name, names in model.gguf_deferred.items():
        meta = model.get_parameter(param_name)
        weight = torch.empty(meta.shape, dtype=meta.dtype)
        offset = 0
        for name in names:
            raw, type_name = model.gguf_blocks[name]
            part = model.convert_weight(name, torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name])))
            weight[offset:offset + part.shape[0]].copy_(part)
            offset += part.shape[0]
        _replace_parameter(model, meta, torch.nn.Parameter(weight, requires_grad=False))
    model.gguf_deferred = {}


def _load_weights(model: LlamaForCausalLM, weights, where: str) -> None:
    """Copies each (HF name, tensor) into its parameter after checking name and shape; with the model still
    on the meta device, only the checks run (the tensors need nothing but a .shape)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = model.expected_weight_names()
    seen: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.shape.tie_word_embeddings:
            continue  # some checkpoints store the tied head anyway
        if name not in expected:
            raise WeightsError(f"{where}: unexpected weight {name!r}; the file does not match the config")
        param_name, part = model.hf_to_param(name)
        param = params[param_name]
        if part is not None:
            sizes = model.fused_split(param_name)
            offset = sum(sizes[:part])
            target = param.data.narrow(0, offset, sizes[part])
        else:
            target = param.data
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(f"{where}: weight {name!r} has shape {tuple(tensor.shape)}, "
                               f"the config implies {tuple(target.shape)}")
        if not target.is_meta:  # a meta parameter: the header pass, which checks shapes only
            target.copy_(model.convert_weight(name, tensor))
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{where}: missing weights {', '.join(missing[:5])}{more} (truncated checkpoint?)")
