"""Architecture registry: a config's architecture name -> the model class and its variant flags."""
from __future__ import annotations

import dataclasses

from kvloom.errors import UnsupportedArchitectureError
from kvloom.models.gemma3 import Gemma3ForCausalLM
from kvloom.models.llama import LlamaForCausalLM, LlamaShape
from kvloom.models.moe import MoeForCausalLM, MoeShape

# name -> extra LlamaShape flags (moe: the mixture-of-experts model of models/moe.py)
_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # mixture of experts (models/moe.py)
    "MixtralForCausalLM": {"moe": True},
    "Qwen2MoeForCausalLM": {"moe": True},
    "Qwen3MoeForCausalLM": {"moe": True, "qk_norm": True},
}
# name -> a model class of its own (its shape class reads the config)
_OWN_CLASSES: dict[str, type[LlamaForCausalLM]] = {"Gemma3ForCausalLM": Gemma3ForCausalLM}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


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
    flags = dict(_ARCHITECTURES[arch])
    if flags.pop("moe", False):
        return MoeForCausalLM, MoeShape.from_moe_hf(hf_config, **flags)
    shape = LlamaShape.from_hf(hf_config, **flags)
    window = getattr(hf_config, "sliding_window", None)
    if arch == "MistralForCausalLM" and window and window < shape.max_position_embeddings:
        # Within the window, sliding attention equals full attention: serve that length exactly.
        shape = dataclasses.replace(shape, max_position_embeddings=window)
    return LlamaForCausalLM, shape
