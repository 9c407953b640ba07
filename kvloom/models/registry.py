"""Architecture registry: a config's architecture name -> the model class and its variant flags."""
from __future__ import annotations

import dataclasses

from kvloom.errors import UnsupportedArchitectureError
from kvloom.models.gemma3 import Gemma3ForCausalLM
from kvloom.models.llama import LlamaForCausalLM, LlamaShape

# name -> extra LlamaShape flags
_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
# name -> a model class of its own (its shape class reads the config)
_OWN_CLASSES: dict[str, type[LlamaForCausalLM]] = {"Gemma3ForCausalLM": Gemma3ForCausalLM}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted([*_ARCHITECTURES, *_OWN_CLASSES])


def architecture_of(hf_config) -> str:
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    return _MODEL_TYPES.get(getattr(hf_config, "model_type", ""), getattr(hf_config, "model_type", "unknown"))


def shape_for(hf_config) -> tuple[type[LlamaForCausalLM], LlamaShape]:
    """The model class and shape for a config, or a clear error naming what is supported."""
    arch = architecture_of(hf_config)
    if arch in _OWN_CLASSES:
        cls = _OWN_CLASSES[arch]
        return cls, cls.shape_class.from_hf(hf_config)
    if arch not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    shape = LlamaShape.from_hf(hf_config, **_ARCHITECTURES[arch])
    window = getattr(hf_config, "sliding_window", None)
    if arch == "MistralForCausalLM" and window and window < shape.max_position_embeddings:
        # Within the window, sliding attention equals full attention: serve that length exactly.
        shape = dataclasses.replace(shape, max_position_embeddings=window)
    return LlamaForCausalLM, shape
