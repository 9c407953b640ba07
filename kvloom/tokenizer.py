"""Tokenizer and chat template, from Hugging Face tokenizer files or GGUF metadata (via transformers)."""
from __future__ import annotations

import json
import os

from jinja2.exceptions import SecurityError
from transformers import AutoTokenizer

from kvloom.errors import InvalidRequestError, KvloomError, ModelNotFoundError
from kvloom.models.gguf_metadata_cache import converted_dir
from kvloom.models.model_source import ModelSource


class Tokenizer:
    """Thin wrapper that knows the model's stop tokens and chat template."""

    def __init__(self, hf_tokenizer, eos_token_ids: set[int]):
        self.hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def load(cls, source: ModelSource, hf_config=None, tokenizer_path: str | None = None) -> "Tokenizer":
        # trust_remote_code=False: a tokenizer_config's auto_map never runs the model directory's Python.
        try:
            if tokenizer_path:
                hf = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
            elif source.gguf_file:
                converted = converted_dir(source)
                hf = (AutoTokenizer.from_pretrained(converted, trust_remote_code=False) if converted is not None
                      else AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                         trust_remote_code=False))
            else:
                hf = AutoTokenizer.from_pretrained(source.directory, trust_remote_code=False)
        except KvloomError:
            raise
        except Exception as e:  # `tokenizers` raises a bare Exception on a malformed tokenizer.json
            where = tokenizer_path or source.gguf_path or source.directory
            raise ModelNotFoundError(f"cannot load a tokenizer from {where}: {type(e).__name__}: {e}") from e
        eos: set[int] = set()
        for ids in (hf.eos_token_id, getattr(hf_config, "eos_token_id", None), _generation_eos(source)):
            if isinstance(ids, int):
                eos.add(ids)
            elif ids:
                eos.update(i for i in ids if isinstance(i, int))
        return cls(hf, eos)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise InvalidRequestError("this model has no chat template; use a plain prompt", field="messages")
        # transformers renders in jinja2's ImmutableSandboxedEnvironment: a template from a model file cannot
        # reach Python objects (attributes starting with _, mutating methods, ...) and raises SecurityError.
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except SecurityError as e:
            raise InvalidRequestError(
                f"this model's chat template tried something the template sandbox forbids ({e}); kvloom renders "
                "chat templates sandboxed and will not render this one: fix the template or send a plain prompt",
                field="messages") from e
        except Exception as e:  # jinja raises on messages the template does not accept
            raise InvalidRequestError(f"the chat template rejected these messages: {e}", field="messages") from e
        # The template writes any BOS itself.
        return self.hf.encode(text, add_special_tokens=False)


def _generation_eos(source: ModelSource):
    path = os.path.join(source.directory, "generation_config.json")
    if source.gguf_file or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {type(e).__name__}: {e}") from e
