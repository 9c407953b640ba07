"""The grammar library: llguidance (chosen by measurement, see kvloom/bench/structured.py --libraries).

Turns a StructuredOutputs into llguidance's grammar text, validates it (no tokenizer needed, so the server
rejects bad input before it reaches the engine), and builds the token-level tokenizer the matchers run on.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf

from kvloom.errors import InvalidRequestError
from kvloom.structured.spec import StructuredOutputs

# JSON comes out in one fixed layout (`{"a": 1, "b": 2}`): with free whitespace a small model can loop on
# newlines and indents until max_tokens and never close the object.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for spec; InvalidRequestError naming the field when it cannot be one."""
    try:
        if spec.kind == "json":
            schema = spec.json if isinstance(spec.json, dict) else {}
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}),
                                                                 defaults=_JSON_DEFAULTS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.kind == "choice":
            # JSON string literals are Lark string literals: quotes and backslashes come out escaped.
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice))
        text = spec.grammar
        if "::=" in text:   # GBNF (llama.cpp's); llguidance converts it to its Lark dialect
            from llguidance.gbnf_to_lark import gbnf_to_lark
            text = gbnf_to_lark(text)
        return llguidance.LLMatcher.grammar_from_lark(text)
    except InvalidRequestError:
        raise
    except Exception as e:   # the library's schema/regex/grammar errors are ValueErrors (and a few others)
        raise InvalidRequestError(f"invalid {spec.field}: {e}", field=spec.field) from e


_validated: OrderedDict[str, str] = OrderedDict()   # key -> grammar text: the server's check warms the engine's
_validated_lock = threading.Lock()


def validate(spec: StructuredOutputs) -> str:
    """The grammar text of a constraint the library accepts; InvalidRequestError (naming the field) otherwise.
    Remembered by key, so a constraint checked by the server costs the engine thread nothing."""
    key = spec.key()
    with _validated_lock:
        if key in _validated:
            _validated.move_to_end(key)
            return _validated[key]
    text = grammar_text(spec)
    err = llguidance.LLMatcher.validate_grammar(text)
    if err and not err.startswith("WARNING"):
        raise InvalidRequestError(f"invalid {spec.field}: {err}", field=spec.field)
    with _validated_lock:
        _validated[key] = text
        while len(_validated) > 512:
            _validated.popitem(last=False)
    return text


def build_tokenizer(hf_tokenizer, vocab_size: int, eos_ids) -> llguidance.LLTokenizer:
    """The library's view of the vocabulary (~0.4 s at 49k tokens: built once, off the engine thread).
    vocab_size: the logits' width (embedding rows may exceed the tokenizer's tokens); eos_ids: every id that
    ends generation, so a finished grammar allows each of them."""
    return llguidance.hf.from_tokenizer(hf_tokenizer, max(vocab_size, len(hf_tokenizer)), sorted(eos_ids))
