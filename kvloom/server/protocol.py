"""OpenAI request schemas (pydantic). Responses are built as plain dicts in serving.py."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from typing_extensions import Required, TypedDict


def _unset(v) -> bool:
    return v is None or v is False or v == [] or v == {} or v == ""


def _no_tools(req) -> bool:
    return _unset(getattr(req, "tools", None) or req.extra("tools")) and _unset(req.extra("functions"))


# Fields of OpenAI's (and vLLM's) API that kvloom does not implement, each with the values that
# mean "not used" and so are harmless. Any other value is refused with a 400 naming the field,
# never silently ignored: a client relying on it would get an answer that looks right but is not.
_NOT_IMPLEMENTED = {
    "functions": lambda v, r: _unset(v),   # the legacy function-calling fields: use tools / tool_choice
    "function_call": lambda v, r: v is None or (v in ("none", "auto") and _no_tools(r)),
    "logit_bias": lambda v, r: v is None or v == {},
    "prediction": lambda v, r: v is None,
    "audio": lambda v, r: v is None,
    "modalities": lambda v, r: v is None or v == ["text"],
    "web_search_options": lambda v, r: v is None,
    "min_tokens": lambda v, r: v is None or v == 0,
    "prompt_logprobs": lambda v, r: v is None,
    "allowed_token_ids": lambda v, r: v is None,
    "bad_words": lambda v, r: _unset(v),
    "include_stop_str_in_output": lambda v, r: _unset(v),
    "truncate_prompt_tokens": lambda v, r: v is None,
    "logits_processors": lambda v, r: _unset(v),
}
_NOT_IMPLEMENTED_CHAT = {
    "chat_template": lambda v, r: v is None,
    "chat_template_kwargs": lambda v, r: _unset(v),
    "documents": lambda v, r: _unset(v),
    "continue_final_message": lambda v, r: _unset(v),
    "echo": lambda v, r: _unset(v),
}
_NOT_IMPLEMENTED_COMPLETION = {
    "tools": lambda v, r: _unset(v),      # tools are a chat feature
    "tool_choice": lambda v, r: v is None or v == "none",
    "parallel_tool_calls": lambda v, r: v is None,
    "suffix": lambda v, r: v is None or v == "",
}


class _Request(BaseModel):
    # Unknown fields are accepted (user, metadata, store, service_tier... change nothing here),
    # except those of _NOT_IMPLEMENTED, refused by unsupported_field().
    model_config = ConfigDict(extra="allow")
    _not_implemented: ClassVar[dict] = {}   # per endpoint, on top of _NOT_IMPLEMENTED

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # extras vLLM users rely on
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # An agent program's id: its KV is kept between its calls until DELETE /v1/sessions/{session_id}, so it
    # must be an id that path can carry: no "/", and not "." or ".." (clients collapse those segments).
    session_id: str | None = Field(None, pattern=r"^[^/]*$")
    cache_salt: str | None = None   # vLLM's: a tenant's prefix-cache blocks are shared only with its own salt
    priority: int = 0               # vLLM's: lower values are scheduled first (and may preempt higher ones)
    # structured outputs (kvloom/structured): OpenAI's response_format, vLLM's structured_outputs and the
    # older guided_* names; checked and translated in serving.py (at most one of them)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # inference-time scaling (kvloom/scaling; checked in serving.py): best of N samples (OpenAI's legacy field),
    # self-consistency vote, adaptive sampling; results in the response's `kvloom` object
    best_of: int | None = None
    scorer: str | None = None
    vote: dict[str, Any] | None = None
    adaptive: dict[str, Any] | None = None
    # search (kvloom/scaling/search_spec.py, checked in serving.py): vLLM's beam search fields, and a particle
    # filter whose partial answers the served model grades; choices and the `kvloom` object once it is done
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float | None = None
    guided_search: dict[str, Any] | None = None

    @field_validator("session_id")
    @classmethod
    def _addressable_session(cls, v: str | None) -> str | None:
        if v in (".", ".."):
            raise ValueError("must not be '.' or '..': DELETE /v1/sessions/{session_id} could not name it")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def extra(self, name: str):
        """An undeclared field's value (None when absent)."""
        return (self.model_extra or {}).get(name)

    def unsupported_field(self) -> str | None:
        """The first field set to a value kvloom would otherwise ignore, or None."""
        for name, harmless in {**_NOT_IMPLEMENTED, **self._not_implemented}.items():
            if name in (self.model_extra or {}) and not harmless(self.extra(name), self):
                return name
        return None


# Typed dicts, not models: pydantic checks their fields (a wrong type is a 400 naming it, not a TypeError deep
# in serving.py or the tool renderer) and the values stay the dicts serving.py and the chat template read.
class ContentPart(TypedDict, total=False):
    type: Required[str]
    text: str


class ToolCallFunction(TypedDict, total=False):
    name: Required[str]
    arguments: str | dict[str, Any]     # OpenAI's is a JSON string; an object is taken as is


class ToolCall(TypedDict, total=False):
    id: str
    type: str
    function: Required[ToolCallFunction]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None    # an assistant turn's earlier calls


class ChatCompletionRequest(_Request):
    _not_implemented: ClassVar[dict] = _NOT_IMPLEMENTED_CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None    # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Request):
    _not_implemented: ClassVar[dict] = _NOT_IMPLEMENTED_COMPLETION
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class LoadLoraRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body: a peft adapter directory served under lora_name."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error",
                    "overloaded_error", "rate_limit_error"]


def error_body(message: str, type_: ErrorType, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
