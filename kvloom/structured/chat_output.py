"""One chat choice's text -> the message parts OpenAI returns (reasoning_content, content, tool_calls), and
the stream of deltas that joins to exactly that message.

The parsers are pure and prefix-stable (see tool_parsers), so a delta is the difference between the parse of
the text so far and the parse before it: new content, new calls (id, name), new argument text.
"""
from __future__ import annotations

import uuid

from kvloom.structured.reasoning import ReasoningParser
from kvloom.structured.tool_parsers import Parsed, ParsedCall, ToolParser


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChoiceOutput:
    def __init__(self, tool_parser: ToolParser | None, reasoning: ReasoningParser | None, parallel: bool = True):
        self.tool_parser, self.reasoning, self.parallel = tool_parser, reasoning, parallel
        self.text = ""
        self.ids: list[str] = []
        self.sent = ("", "", [])   # reasoning, content, each call's arguments: what the stream has sent

    def parse(self, text: str, final: bool) -> tuple[str, Parsed]:
        reasoning, rest = self.reasoning.split(text, final) if self.reasoning else ("", text)
        if self.reasoning and not final and not reasoning and not rest:
            return "", Parsed("")
        parsed = self.tool_parser.parse(rest, final) if self.tool_parser else Parsed(rest)
        if not self.parallel:
            parsed.calls = parsed.calls[:1]
        while len(self.ids) < len(parsed.calls):
            self.ids.append(call_id())
        return reasoning, parsed

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The final message and finish reason ("tool_calls" when the model called tools)."""
        reasoning, parsed = self.parse(text, True)
        msg = {"role": "assistant", "content": parsed.content if (parsed.content or not parsed.calls) else None}
        if self.reasoning is not None:
            msg["reasoning_content"] = reasoning or None
        if parsed.calls:
            msg["tool_calls"] = [_call(self.ids[i], c) for i, c in enumerate(parsed.calls)]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return msg, finish_reason

    def delta(self, delta_text: str, final: bool) -> dict:
        """The stream delta for text that just arrived (empty dict: nothing to send yet)."""
        self.text += delta_text
        reasoning, parsed = self.parse(self.text, final)
        sent_r, sent_c, sent_args = self.sent
        out: dict = {}
        if len(reasoning) > len(sent_r):
            out["reasoning_content"] = reasoning[len(sent_r):]
        if len(parsed.content) > len(sent_c):
            out["content"] = parsed.content[len(sent_c):]
        calls = []
        for i, c in enumerate(parsed.calls):
            if i >= len(sent_args):
                calls.append({"index": i, "id": self.ids[i], "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}})
            elif len(c.arguments) > len(sent_args[i]):
                calls.append({"index": i, "function": {"arguments": c.arguments[len(sent_args[i]):]}})
        if calls:
            out["tool_calls"] = calls
        self.sent = (reasoning, parsed.content, [c.arguments for c in parsed.calls])
        return out

    @property
    def called_tools(self) -> bool:
        return bool(self.sent[2])


def _call(cid: str, c: ParsedCall) -> dict:
    return {"id": cid, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
