"""Writing a trained adapter the way the `peft` library saves one, so kvloom, peft and vLLM can all load it."""
from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from kvloom.finetune.lora_forward import ATTENTION_MODULES, TrainableLora


def save_peft_adapter(lora: TrainableLora, path: str, base_model: str) -> None:
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for (layer, module), (a, b) in lora.weights.items():
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().contiguous().clone()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.targets),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "inference_mode": True}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
