"""OpenAI tools on a chat request: checked, rendered into the prompt, and (for tool_choice required or a
named function) forced by a grammar, so even a small model emits well-formed calls with valid arguments.

Forced calls use a format of their own, not the model family's: a named function's output is its arguments
object; `required` gives a JSON list of {"name", "parameters"} (vLLM does the same). The parsers for these
are in tool_parsers (ForcedNamedParser, ForcedListParser).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from kvloom.errors import InvalidRequestError
from kvloom.structured.spec import StructuredOutputs
from kvloom.structured.tool_parsers import FamilyFormat, ForcedListParser, ForcedNamedParser, ToolParser


@dataclass
class ToolSetup:
    tools: list[dict]                 # OpenAI's shape: {"type": "function", "function": {...}}
    choice: str                       # none | auto | required | named
    function: str | None = None       # the named function
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def check_tools(tools, tool_choice, parallel_tool_calls) -> ToolSetup:
    """InvalidRequestError naming the field for a malformed tool or a tool_choice naming no tool."""
    tools = tools or []
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                      field="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object", field="tools")
        names.append(fn["name"])
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", field="tools")
    choice, function = tool_choice if tool_choice is not None else ("auto" if tools else "none"), None
    if isinstance(choice, dict):
        function = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if function not in names:
            raise InvalidRequestError(f"tool_choice names {function!r}, which is not among the tools {names}",
                                      field="tool_choice")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                                  field="tool_choice")
    if choice in ("auto", "required") and not tools:
        raise InvalidRequestError(f"tool_choice={choice} needs tools", field="tool_choice")
    return ToolSetup(tools, choice, function, parallel_tool_calls is not False)


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_constraint(setup: ToolSetup) -> StructuredOutputs | None:
    """The grammar that makes the output a valid call (None unless tool_choice is required or named)."""
    if setup.choice == "named":
        tool = next(t for t in setup.tools if t["function"]["name"] == setup.function)
        return StructuredOutputs(json=_parameters(tool))
    if setup.choice == "required":
        item = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                            "parameters": _parameters(t)},
                           "required": ["name", "parameters"], "additionalProperties": False}
                          for t in setup.tools]}
        schema = {"type": "array", "items": item, "minItems": 1}
        if not setup.parallel:
            schema["maxItems"] = 1
        return StructuredOutputs(json=schema)
    return None


def output_parser(setup: ToolSetup, family: FamilyFormat) -> ToolParser | None:
    """How this request's output turns into calls (None: plain content)."""
    if not setup.active:
        return None
    if setup.choice == "named":
        return ForcedNamedParser(setup.function)
    if setup.choice == "required":
        return ForcedListParser()
    return family


def template_messages(messages: list[dict], setup: ToolSetup, family: FamilyFormat,
                      template_renders_tools: bool) -> list[dict]:
    """Messages for the chat template. Assistant tool_calls carry their arguments as objects (templates
    write them with tojson). A template that renders no tools gets them from the parser: the tool list as
    a system message, earlier calls as text in the parser's format."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            fns = [{"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments"))}
                   for c in calls]
            if template_renders_tools:
                m["tool_calls"] = [{**c, "function": f} for c, f in zip(calls, fns)]
            else:
                m.pop("tool_calls")
                m["content"] = ((m.get("content") or "") + family.render_calls(fns))
        out.append(m)
    if setup.active and not template_renders_tools:
        prompt = family.system_prompt(setup.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments or {}


def renders_tools(hf_tokenizer) -> bool:
    """Whether the chat template writes a tools list (tried once, with a sentinel tool)."""
    if not hf_tokenizer.chat_template:
        return False
    probe = [{"type": "function", "function": {"name": "kvloom_probe_tool_x", "parameters": {"type": "object"}}}]
    try:
        text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False,
                                                add_generation_prompt=True)
    except Exception:
        return False
    return "kvloom_probe_tool_x" in text


def apply_template(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> list[int]:
    """Prompt ids of a chat with tools (transformers renders them through the template's `tools`)."""
    if not tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt)
    hf = tokenizer.hf
    if not hf.chat_template:
        raise InvalidRequestError("this model has no chat template; use a plain prompt", field="messages")
    try:
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise InvalidRequestError(f"the chat template rejected these messages: {e}", field="messages") from e
    return hf.encode(text, add_special_tokens=False)
