"""Weights of a Hugging Face directory: every *.safetensors file in it, sharded or not."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from kvloom.errors import WeightsError


def safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise WeightsError(f"shards named in {index} are missing: {', '.join(missing)}")
        return [os.path.join(directory, s) for s in shards]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise WeightsError(f"no *.safetensors files in {directory} (kvloom reads safetensors or GGUF)")
    return files


def iter_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except WeightsError:
            raise
        except Exception as e:  # safetensors raises on a header or body that does not add up
            raise WeightsError(f"cannot read {path}: {e} (truncated or corrupt?)") from e
