"""Build a model from a ModelSource: config, architecture, weights, checks."""
from __future__ import annotations

import logging
import sys

import torch
from tqdm import tqdm
from transformers import AutoConfig

from kvloom.errors import ModelNotFoundError, UnsupportedArchitectureError, WeightsError
from kvloom.models.gguf_metadata_cache import converted_dir
from kvloom.models.gguf_weights import iter_gguf_weights, open_gguf, projection_types
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.model_source import ModelSource
from kvloom.models.registry import shape_for
from kvloom.models.rope import RotaryEmbedding
from kvloom.models.safetensors_weights import iter_safetensors_weights

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_config(source: ModelSource):
    try:
        if source.gguf_file:
            converted = converted_dir(source)
            if converted is not None:
                return AutoConfig.from_pretrained(converted)
            return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)
        return AutoConfig.from_pretrained(source.directory)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e)
        if "does not recognize this architecture" in msg or "not supported" in msg or isinstance(e, KeyError):
            raise UnsupportedArchitectureError(f"cannot build a config for {source.name}: {msg}") from e
        raise ModelNotFoundError(f"cannot read the config of {source.name}: {msg}") from e


def load_model(source: ModelSource, dtype: torch.dtype, max_positions: int | None = None,
               keep_gguf_blocks: bool = False) -> tuple[LlamaForCausalLM, object]:
    """Returns (model in eval mode with all weights loaded, its transformers config). keep_gguf_blocks: a
    GGUF's 4-bit projection blocks stay on model.gguf_blocks (name -> (raw rows, type)) for the 4-bit path."""
    hf_config = load_hf_config(source)
    reader = open_gguf(source.gguf_path) if source.gguf_file else None
    if reader is not None:
        # GGUF drops output.weight when the head is tied to the embedding.
        hf_config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    cls, shape = shape_for(hf_config)
    max_positions = min(max_positions or shape.max_position_embeddings, shape.max_position_embeddings)
    rope = RotaryEmbedding(hf_config, shape.head_dim, max_positions)
    with torch.device("meta"):  # no time spent on random init: every weight is loaded below
        model = cls(shape, rope)
    model.to_empty(device="cpu")
    if shape.tie_word_embeddings:  # to_empty() gives the two names separate storage
        model.lm_head.weight = model.embed_tokens.weight
    raw_blocks: dict | None = {} if keep_gguf_blocks and reader is not None else None
    weights = (iter_gguf_weights(reader, shape.num_heads, shape.num_kv_heads, raw_blocks) if reader is not None
               else iter_safetensors_weights(source.directory))
    total = len(reader.tensors) if reader is not None else None
    bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", disable=not sys.stderr.isatty(),
               leave=False)
    _load_weights(model, bar, source.name)
    model = model.to(dtype).eval().requires_grad_(False)
    model.gguf_blocks = raw_blocks or {}
    model.gguf_projection_types = projection_types(reader) if reader is not None else set()
    return model, hf_config


def _load_weights(model: LlamaForCausalLM, weights, model_name: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = model.expected_weight_names()
    seen: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.shape.tie_word_embeddings:
            continue  # some checkpoints store the tied head anyway
        if name not in expected:
            raise WeightsError(f"{model_name}: unexpected weight {name!r}; the file does not match the config")
        param_name, part = model.hf_to_param(name)
        param = params[param_name]
        if part is not None:
            sizes = model.fused_split(param_name)
            offset = sum(sizes[:part])
            target = param.data.narrow(0, offset, sizes[part])
        else:
            target = param.data
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(f"{model_name}: weight {name!r} has shape {tuple(tensor.shape)}, "
                               f"the config implies {tuple(target.shape)}")
        target.copy_(tensor)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{model_name}: missing weights {', '.join(missing[:5])}{more} (truncated checkpoint?)")
