"""Tool-call formats by model family: parse a (partial) completion into content and calls, render calls and
tool lists for templates that cannot.

parse(text, final) is a pure function of the text, and prefix-stable: as text grows, the content and each
call's arguments only grow, and calls only get added. Streaming sends the difference between successive
parses, so the fragments of a stream always join to the non-streamed message (kvloom/structured/chat_output.py).
Arguments are the model's own JSON text, as OpenAI returns them.
"""
from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field


@dataclass
class ParsedCall:
    name: str
    arguments: str       # JSON text, a prefix of it while the call is incomplete
    complete: bool = False


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


# {"name": "...", "arguments" | "parameters": <the arguments object starts here>
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def object_end(text: str, start: int) -> int | None:
    """The index after the JSON object starting at text[start] ('{'), or None while it is still open."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def scan_calls(region: str) -> list[ParsedCall]:
    """Every {"name": ..., "arguments": {...}} in region, in order; the last may be open."""
    calls, pos = [], 0
    while (m := _HEADER.search(region, pos)) is not None:
        start = m.end()
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            name = m.group(1)
        if start == len(region):          # the arguments have not started yet
            calls.append(ParsedCall(name, ""))
            break
        if region[start] != "{":           # not an arguments object: not a call
            pos = start
            continue
        end = object_end(region, start)
        calls.append(ParsedCall(name, region[start:end] if end else region[start:], end is not None))
        if end is None:
            break
        pos = end
    return calls


def held_back(text: str, tag: str) -> int:
    """Length of text's longest suffix that could begin tag (it waits before counting as content)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _schema_text(tools: list[dict]) -> str:
    return "\n".join(json.dumps(t.get("function", t)) for t in tools)


class ToolParser(abc.ABC):
    """Reads a completion's tool calls (a model family's format, or a grammar-forced one)."""

    @abc.abstractmethod
    def parse(self, text: str, final: bool) -> Parsed: ...


class FamilyFormat(ToolParser):
    """A model family's tool-call format: read, and also written into prompts whose template cannot."""
    name = ""

    @abc.abstractmethod
    def system_prompt(self, tools: list[dict]) -> str:
        """Tools as a system message, for chat templates that do not render tools."""

    @abc.abstractmethod
    def render_calls(self, calls: list[dict]) -> str:
        """An assistant turn's tool calls as text, for chat templates that do not render them."""


class TaggedParser(FamilyFormat):
    """Calls between <tool_call> tags; everything before the first tag is content."""
    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        at = text.find(self.open_tag)
        if at == -1:
            return Parsed(text if final else text[:len(text) - held_back(text, self.open_tag)])
        return Parsed(text[:at], scan_calls(text[at:]))


class HermesParser(TaggedParser):
    """Hermes / Qwen 2.5 / Qwen 3: one <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> per call."""
    name = "hermes"

    def system_prompt(self, tools):
        return ("You may call one or more functions to assist with the user query.\n\nYou are provided with "
                "function signatures within <tools></tools> XML tags:\n<tools>\n" + _schema_text(tools) +
                "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def render_calls(self, calls):
        return "\n".join(f'<tool_call>\n{json.dumps({"name": c["name"], "arguments": c["arguments"]})}\n</tool_call>'
                         for c in calls)


class SmolLMParser(TaggedParser):
    """SmolLM2 (the default model's family): <tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>."""
    name = "smollm"

    def system_prompt(self, tools):
        return ("You are an expert in composing functions. You are given a question and a set of possible "
                "functions. Based on the question, you will need to make one or more function/tool calls to "
                "achieve the purpose.\n\nYou have access to the following tools:\n<tools>" + _schema_text(tools) +
                "</tools>\n\nThe output MUST strictly adhere to the following format, and NO other text MUST be "
                'included.\n<tool_call>[\n{"name": "func_name1", "arguments": {"argument1": "value1"}}\n]'
                "</tool_call>")

    def render_calls(self, calls):
        return "<tool_call>" + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls]) + \
            "</tool_call>"


class Llama3JsonParser(FamilyFormat):
    """Llama 3.1+ JSON tool calls: the whole turn is {"name": ..., "parameters": {...}} (several joined by
    "; "), maybe after <|python_tag|>."""
    name = "llama3_json"
    tag = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        body = text.lstrip()
        if body.startswith(self.tag):
            body = body[len(self.tag):].lstrip()
            if not body and not final:
                return Parsed("")
        elif not final and (not body or self.tag.startswith(body)):
            return Parsed("")
        if body.startswith("{"):
            calls = scan_calls(body)
            if calls:
                return Parsed("", calls)
            if not final:   # still deciding whether this JSON is a call
                return Parsed("")
        return Parsed(text)

    def system_prompt(self, tools):
        return ("When you receive a tool call response, use the output to format an answer to the original user "
                "question.\n\nGiven the following functions, please respond with a JSON for a function call with "
                'its proper arguments that best answers the given prompt.\n\nRespond in the format {"name": '
                'function name, "parameters": dictionary of argument name and its value}. Do not use variables.'
                "\n\n" + _schema_text(tools))

    def render_calls(self, calls):
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)


class ForcedNamedParser(ToolParser):
    """tool_choice naming a function: the grammar makes the whole output that function's arguments."""

    def __init__(self, function: str):
        self.function = function

    def parse(self, text, final):
        start = len(text) - len(text.lstrip())
        end = object_end(text, start) if text[start:start + 1] == "{" else None
        return Parsed("", [ParsedCall(self.function, text[start:end] if end else text[start:], end is not None)])


class ForcedListParser(ToolParser):
    """tool_choice=required: the grammar makes the output a JSON list of {"name": ..., "parameters": {...}}."""

    def parse(self, text, final):
        return Parsed("", scan_calls(text))


PARSERS: dict[str, type[FamilyFormat]] = {
    "hermes": HermesParser, "qwen": HermesParser, "qwen2_5": HermesParser, "qwen3": HermesParser,
    "smollm": SmolLMParser, "llama3_json": Llama3JsonParser, "llama": Llama3JsonParser,
}


def parser_for(name: str | None, chat_template: str | None) -> FamilyFormat:
    """By name (--tool-call-parser), else from the chat template's own tool format."""
    if name:
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}")
        return PARSERS[name]()
    t = chat_template or ""
    if "<|python_tag|>" in t or '"parameters"' in t and "ipython" in t:
        return Llama3JsonParser()
    if "<tool_call>" in t:
        return HermesParser()
    return SmolLMParser()   # the default model's family (its template renders no tools: kvloom does)
