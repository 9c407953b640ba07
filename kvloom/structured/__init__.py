"""Structured outputs and tool calling.

spec         what an output must match (StructuredOutputs: json schema, json object, regex, choice, grammar)
backend      the grammar library (llguidance): grammar text, validation, its vocabulary view
compiler     grammars compiled off the engine thread, cached by constraint
matcher      a request's grammar state and the token masks on its logits rows (plain rows and draft trees)
api_fields   OpenAI's response_format and vLLM's structured_outputs / guided_* -> one StructuredOutputs
tools        tools and tool_choice: checks, prompt rendering, the grammar that forces a call
tool_parsers tool-call formats by model family (parse, render), prefix-stable for streaming
reasoning    <think>...</think> -> reasoning_content
chat_output  one chat choice's text -> message parts, and the stream deltas that join to them
"""
from kvloom.structured.spec import StructuredOutputs

__all__ = ["StructuredOutputs"]
