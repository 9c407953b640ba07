"""Tool calls and reasoning through the OpenAI client: forced calls (required, named) are valid, streamed
fragments join to the non-streamed message, parsers by family, history with tool messages, bad input."""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest

from server_harness import ServerThread, tiny_engine
from kvloom.structured.chat_output import ChoiceOutput
from kvloom.structured.reasoning import reasoning_parser
from kvloom.structured.tool_parsers import (ForcedListParser, HermesParser, Llama3JsonParser, SmolLMParser,
                                            parser_for)
from kvloom.structured.tools import check_tools, template_messages

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}, "days": {"type": "integer",
                                                                                   "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A tiny model with room for the tool prompts (in its small vocabulary they run to ~700 tokens)."""
    from conftest import save_tiny_model
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-long")), "llama", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(long_model_dir):
    engine = tiny_engine(long_model_dir, max_model_len=2048, kv_cache_memory=16 << 20)
    engine.reasoning_parser = "qwen3"       # what `kvloom serve --reasoning-parser qwen3` sets
    with ServerThread(engine) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _assemble(chunks):
    """Streamed delta.tool_calls fragments joined, as a client does."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert slot["id"] is None     # the id and name come once, in the call's first fragment
                    slot["id"], slot["name"] = tc.id, tc.function.name
                slot["arguments"] += tc.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish


# (a random model may extend a parallel list of calls until max_tokens: one call, or one named, always ends)
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_are_valid_and_stream_to_the_same_message(client, tool_choice):
    for seed in range(3):
        kw = dict(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed,
                  max_tokens=120, parallel_tool_calls=False)
        full = client.chat.completions.create(**kw)
        msg = full.choices[0].message
        assert full.choices[0].finish_reason == "tool_calls", msg
        assert msg.tool_calls and msg.content is None
        for call in msg.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        content, calls, finish = _assemble(client.chat.completions.create(**kw, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(t.function.name, t.function.arguments) for t in msg.tool_calls]


def test_parallel_calls_are_each_valid(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, tool_choice="required",
                                           temperature=0.7, seed=seed, max_tokens=200)
        calls = r.choices[0].message.tool_calls
        assert calls
        if r.choices[0].finish_reason == "length":
            calls = calls[:-1]                     # the last one may be cut off
        else:
            assert r.choices[0].finish_reason == "tool_calls"
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_history_with_tool_calls_and_tool_messages(client, server):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # what the template got: the tiny template renders no tools, so the parser's format carries them
    text = server.engine.tokenizer.decode(
        server.async_engine.engine.tokenizer.apply_chat_template(
            template_messages(history, check_tools(TOOLS, None, None), SmolLMParser(), False)), False)
    assert "<tools>" in text and "get_time" in text
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"' in text and '{"temp": 21}' in text


def test_template_that_renders_tools_gets_them(tiny_model_dir):
    from transformers import AutoTokenizer
    from kvloom.structured.tools import renders_tools
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    assert not renders_tools(tok)
    tok.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n")
    assert renders_tools(tok)
    assert isinstance(parser_for(None, tok.chat_template), HermesParser)
    msgs = template_messages(MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}],
        check_tools(TOOLS, "auto", None), HermesParser(), True)
    assert msgs[-1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}    # objects, for tojson
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    assert '"name": "get_weather"' in text and '{"name": "get_time", "arguments": {"zone": "UTC"}}' in text


def test_bad_tool_input_is_400_naming_the_field(server):
    def post(**body):
        return httpx.post(server.url + "/v1/chat/completions",
                          json={"model": "tiny", "messages": MSGS, "max_tokens": 2, **body})
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "zzz"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "zzz"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}, "guided_json"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ]
    for body, field in cases:
        r = post(**body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == field, (body, r.json())
    assert not server.engine.has_unfinished()


def test_structured_outputs_on_both_endpoints(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, temperature=1.0, seed=3, n=3,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.message.content in ("red", "green", "blue") for c in r.choices)
    r = client.completions.create(model="tiny", prompt="The number", max_tokens=40, temperature=1.0, seed=4,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{2,4}"}})
    assert r.choices[0].text.isdigit() and 2 <= len(r.choices[0].text) <= 4
    r = client.completions.create(model="tiny", prompt="x", max_tokens=60, temperature=0,
                                  extra_body={"guided_grammar": 'start: "yes" | "no" " way"'})
    assert r.choices[0].text in ("yes", "no way")
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": TIME}})
    jsonschema.validate(json.loads(r.choices[0].message.content), TIME)
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=80, temperature=0, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "t", "schema": TIME}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content


# ---- parsers: prefix-stable, so any chunking of a stream joins to the final parse --------------------------

def _check_stream_joins(parser, reasoning, text, seed=0):
    final, _ = ChoiceOutput(parser, reasoning).message(text, "stop")
    out = ChoiceOutput(parser, reasoning)
    rng = random.Random(seed)
    content, rsn, calls, i = "", "", {}, 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 4))
        d = out.delta(text[i:j], j == len(text))
        i = j
        content += d.get("content", "")
        rsn += d.get("reasoning_content", "")
        for tc in d.get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
            if "id" in tc:
                slot["name"] = tc["function"]["name"]
            slot["arguments"] += tc["function"]["arguments"]
    assert content == (final["content"] or "")
    assert rsn == (final.get("reasoning_content") or "")
    assert [calls[k] for k in sorted(calls)] == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                                 for c in final.get("tool_calls", [])]
    return final


@pytest.mark.parametrize("seed", range(5))
def test_family_parsers_parse_and_stream(seed):
    hermes = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {x}", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "\\"UTC\\""}}\n</tool_call>')
    m = _check_stream_joins(HermesParser(), None, hermes, seed)
    assert m["content"] == "Let me check." and [c["function"]["name"] for c in m["tool_calls"]] == \
        ["get_weather", "get_time"]
    assert json.loads(m["tool_calls"][1]["function"]["arguments"]) == {"zone": '"UTC"'}
    smol = '<tool_call>[{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", ' \
           '"arguments": {"city": "Rome"}}]</tool_call>'
    m = _check_stream_joins(SmolLMParser(), None, smol, seed)
    assert m["content"] is None and len(m["tool_calls"]) == 2
    llama = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "PST"}}; {"name": "get_weather", ' \
            '"parameters": {"city": "Oslo"}}'
    m = _check_stream_joins(Llama3JsonParser(), None, llama, seed)
    assert [json.loads(c["function"]["arguments"]) for c in m["tool_calls"]] == [{"zone": "PST"}, {"city": "Oslo"}]
    assert _check_stream_joins(Llama3JsonParser(), None, '{"just": "json"}', seed)["content"] == '{"just": "json"}'
    assert _check_stream_joins(HermesParser(), None, "plain text < not a tag", seed)["content"] == \
        "plain text < not a tag"
    r = _check_stream_joins(HermesParser(), reasoning_parser("qwen3"),
                            '<think>\nthe user wants <b>weather</b>\n</think>\n\n<tool_call>\n{"name": "get_time", '
                            '"arguments": {}}\n</tool_call>', seed)
    assert r["reasoning_content"] == "\nthe user wants <b>weather</b>\n" and r["tool_calls"]
    r = _check_stream_joins(None, reasoning_parser("deepseek_r1"), "thinking...</think>The answer.", seed)
    assert (r["reasoning_content"], r["content"]) == ("thinking...", "The answer.")
    r = _check_stream_joins(None, reasoning_parser("qwen3"), "No thinking here.", seed)
    assert (r["reasoning_content"], r["content"]) == (None, "No thinking here.")
    m = _check_stream_joins(ForcedListParser(), None, '[{"name": "get_time", "parameters": {"zone": "x"}}]', seed)
    assert m["tool_calls"][0]["function"]["arguments"] == '{"zone": "x"}'


def test_reasoning_content_streams_through_the_server(client):
    # the tiny model writes no <think>: everything is content, and reasoning_content stays empty
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0)
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_default_model_tool_calls_round_trip():
    """The small default model (SmolLM2 format) with the official client: forced calls are valid, streamed
    and not; auto parses whatever it writes."""
    with ServerThread(tiny_engine(None, max_model_len=2048)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            kw = dict(model="tiny", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=100, temperature=0)
            msg = client.chat.completions.create(**kw).choices[0].message
            assert msg.tool_calls
            for c in msg.tool_calls:
                jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
            _, calls, finish = _assemble(client.chat.completions.create(**kw, stream=True))
            assert finish == "tool_calls"
            assert [(c["name"], c["arguments"]) for c in calls] == \
                [(t.function.name, t.function.arguments) for t in msg.tool_calls]
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=60, temperature=0)
        m = r.choices[0].message
        assert m.content or m.tool_calls
        for c in m.tool_calls or []:
            assert c.function.name in SCHEMAS


def test_offline_chat_with_tools(long_model_dir):
    from kvloom import LLM, SamplingParams
    llm = LLM(long_model_dir, max_model_len=2048, kv_cache_memory=16 << 20)
    r = llm.chat(MSGS, SamplingParams(temperature=1.0, seed=2, max_tokens=100), tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})[0]
    call = r.outputs[0].tool_calls[0]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    r = llm.chat(MSGS, SamplingParams(temperature=0, max_tokens=5), tools=TOOLS)[0]   # auto: parsed if any
    assert r.outputs[0].tool_calls is None or all(c["function"]["name"] in SCHEMAS for c in r.outputs[0].tool_calls)
