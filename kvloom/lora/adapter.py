"""A LoRA adapter as the `peft` library saves it: adapter_config.json + adapter_model.safetensors.

Only what kvloom applies exactly is accepted: plain LoRA (no DoRA, no trained biases, no extra saved modules)
on the projections of the decoder layers. Anything else is a clear error naming the file and the field, never
an adapter silently applied in part.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvloom.errors import InvalidRequestError

# peft's module names -> (kvloom's fused linear, part index within it)
TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
_NAME = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                   r"(?:\.default)?\.weight$")
# Config fields whose non-default values would change what the adapter computes in ways kvloom does not apply.
_REFUSED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
            "trainable_token_indices": None, "target_parameters": None, "use_qalora": False}


class LoraAdapterError(InvalidRequestError):
    """An adapter directory kvloom cannot serve (missing files, shapes not of this model, rank too high...)."""


@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int
    scaling: float                      # lora_alpha / r (or / sqrt(r) with rslora)
    # (layer, peft module name) -> (A [r, in], B [out, r]), float32
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * 4 + b.numel() * 4 for a, b in self.weights.values())


def load_adapter(name: str, path: str, part_shapes: dict[str, list[tuple[int, int]]], num_layers: int,
                 max_rank: int) -> LoraAdapter:
    """Read and check an adapter directory. part_shapes: fused linear -> (out, in) of each part, as the base
    model has them; max_rank: the server's --max-lora-rank."""
    def bad(why: str) -> LoraAdapterError:
        return LoraAdapterError(f"LoRA adapter {name!r} at {path}: {why}", field="lora_path")

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isdir(path):
        raise bad("not a directory")
    if not os.path.isfile(config_path):
        raise bad("no adapter_config.json (save the adapter with peft's save_pretrained)")
    if not os.path.isfile(weights_path):
        raise bad("no adapter_model.safetensors (pickled adapter_model.bin is not loaded)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise bad(f"adapter_config.json is not JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise bad(f"peft_type {config.get('peft_type') if isinstance(config, dict) else None!r} is not LORA")
    for field, default in _REFUSED.items():
        value = config.get(field)
        if value not in (None, default, {}, [], False):   # absent, or set to its no-op value
            raise bad(f"{field}={value!r} is not supported (plain LoRA only)")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise bad(f"r={rank!r} and lora_alpha={alpha!r} must be a positive integer and a number")
    if rank > max_rank:
        raise bad(f"rank {rank} is above this server's --max-lora-rank {max_rank}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise bad(f"adapter_model.safetensors cannot be read ({e})") from e

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _NAME.search(key)
        if m is None:
            raise bad(f"tensor {key!r} is not a LoRA A/B weight of a decoder-layer projection")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGETS:
            raise bad(f"tensor {key!r}: LoRA on {module!r} is not supported (only {', '.join(TARGETS)})")
        if not 0 <= layer < num_layers:
            raise bad(f"tensor {key!r}: the base model has {num_layers} layers")
        pairs.setdefault((layer, module), {})[which] = t
    if not pairs:
        raise bad("no LoRA weights in adapter_model.safetensors")
    weights = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise bad(f"layer {layer} {module}: lora_A and lora_B must both be present")
        fused, part = TARGETS[module]
        out_dim, in_dim = part_shapes[fused][part]
        a, b = ab["A"].float(), ab["B"].float()
        if tuple(a.shape) != (rank, in_dim) or tuple(b.shape) != (out_dim, rank):
            raise bad(f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the "
                      f"base model's {module} ({out_dim} x {in_dim}) at rank {rank}")
        weights[(layer, module)] = (a.contiguous(), b.contiguous())
    return LoraAdapter(name, path, rank, float(scaling), weights)
