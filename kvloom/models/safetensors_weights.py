"""Weights of a Hugging Face directory: every *.safetensors file in it, sharded or not."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import safe_open

from kvloom.errors import WeightsError
from kvloom.models.model_source import pickle_files, refuse_pickles


def safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from e
        # A shard is a plain file name inside the model directory, never a path out of it.
        bad = [s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or s in ("", ".", "..")]
        if bad:
            raise WeightsError(f"{index} names shards outside the model directory: {bad[:3]}")
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise WeightsError(f"shards named in {index} are missing: {', '.join(missing)}")
        return [os.path.join(directory, s) for s in shards]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        if pickles := pickle_files(directory):
            raise refuse_pickles(directory, pickles)
        raise WeightsError(f"no *.safetensors files in {directory} (kvloom reads safetensors or GGUF)")
    return files


def safetensors_shapes(directory: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, from the headers alone: nothing is read or allocated."""
    for path in safetensors_files(directory):
        with _reading(path) as f:
            shapes = [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        yield from shapes


def iter_safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(directory):
        with _reading(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextmanager
def _reading(path: str):
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises on a header or body that does not add up
        raise WeightsError(f"cannot read {path}: {e} (truncated or corrupt?)") from e
