"""Reasoning parsers: a completion's <think>...</think> part becomes reasoning_content.

split(text, final) -> (reasoning, content) is prefix-stable like the tool parsers: both parts only grow as the
text grows, so streamed deltas join to the non-streamed message. A partial closing tag waits.
"""
from __future__ import annotations

from kvloom.structured.tool_parsers import held_back

OPEN, CLOSE = "<think>", "</think>"


class ReasoningParser:
    """Qwen3-style: the model opens <think> itself; text that does not start with it is all content."""
    name = "qwen3"
    opened_by_template = False

    def split(self, text: str, final: bool) -> tuple[str, str]:
        body = text.lstrip()
        if body.startswith(OPEN):
            body = body[len(OPEN):]
        elif not self.opened_by_template:
            if not final and OPEN.startswith(body):   # maybe the start of <think>
                return "", ""
            return "", text
        end = body.find(CLOSE)
        if end == -1:
            return (body if final else body[:len(body) - held_back(body, CLOSE)]), ""
        return body[:end], body[end + len(CLOSE):].lstrip()


class OpenedReasoningParser(ReasoningParser):
    """DeepSeek-R1-style: the chat template has opened <think>, so everything up to </think> is reasoning."""
    name = "deepseek_r1"
    opened_by_template = True


REASONING_PARSERS = {"qwen3": ReasoningParser, "deepseek_r1": OpenedReasoningParser}


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    if not name:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {sorted(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]()
