"""What a request's output must match: one JSON schema, any JSON object, a regex, one of some strings, or a
grammar. Plain data (it travels in SamplingParams and request snapshots); the cache key is its canonical text.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from kvloom.errors import InvalidSamplingParamsError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputs:
    """Exactly one of the fields. json: a JSON schema (a dict, or its text); json_object: any JSON object;
    regex: the whole output matches it; choice: the output is one of these strings; grammar: a Lark grammar
    (llguidance's dialect, `start` is the top rule)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise InvalidSamplingParamsError(f"structured_outputs.json is not valid JSON: {e}",
                                                 field="structured_outputs.json") from e
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidSamplingParamsError("structured_outputs.json must be a JSON schema object",
                                             field="structured_outputs.json")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or \
                    any(not isinstance(c, str) or not c for c in self.choice):
                raise InvalidSamplingParamsError("structured_outputs.choice must be a non-empty list of non-empty "
                                                 "strings", field="structured_outputs.choice")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidSamplingParamsError(f"structured_outputs.{name} must be a non-empty string",
                                                 field=f"structured_outputs.{name}")
        if len(self.kinds()) != 1:
            raise InvalidSamplingParamsError(
                f"structured_outputs needs exactly one of {', '.join(KINDS)}; got {self.kinds() or 'none'}",
                field="structured_outputs")

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    @property
    def field(self) -> str:
        """The name a bad value is reported under."""
        return f"structured_outputs.{self.kind}"

    def key(self) -> str:
        """Canonical text: equal constraints share one compiled grammar."""
        return json.dumps({self.kind: getattr(self, self.kind)}, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}

    @classmethod
    def coerce(cls, value) -> "StructuredOutputs | None":
        """From a StructuredOutputs, a dict of its fields (vLLM's request shape), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(KINDS) - {"disable_any_whitespace", "whitespace_pattern", "backend"}
            if unknown:
                raise InvalidSamplingParamsError(f"structured_outputs has unknown keys {sorted(unknown)}",
                                                 field="structured_outputs")
            return cls(**{k: value[k] for k in KINDS if k in value and value[k] is not None})
        raise InvalidSamplingParamsError("structured_outputs must be an object", field="structured_outputs")
