"""schemathesis against the server's own OpenAPI document (kvloom/bench/fuzz.py), a short seeded run per
API-key setting: no 5xx, no hang, and afterwards the server still serves with nothing running and no KV
block held. `kvloom bench fuzz` is the longer run. Also: the fuzzer's own checks fail when they should, and
the inputs found while fuzzing (two 500s, a session DELETE could not close) get a 400 naming the field."""
import asyncio
import json
import time
import urllib.parse

import httpx
import pytest
from pydantic import BaseModel

from kvloom.bench.fuzz import run_fuzz
from server_harness import ServerThread, tiny_engine

# Per operation and mode (positive, negative), plus stateful scenarios: ~500 requests a run. Seeded, so
# every run sends the same cases.
EXAMPLES, SCENARIOS, SEED, KEY = 40, 20, 0, "sk-fuzz"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return tiny_engine(tiny_model_dir("llama"))


def _explain(result: dict) -> str:
    failing = {label: op["first_failures"] for label, op in result["operations"].items() if op["failures"]}
    return json.dumps({"totals": result["totals"], "failing": failing, "untested": result["untested_operations"],
                       "stateful": result["stateful"], "after_run": result["after_run"],
                       "undocumented": result["undocumented_routes_without_key"]}, indent=1, default=str)[:6000]


def _assert_idle(s: ServerThread) -> None:
    # The engine itself, not only its gauges: nothing queued, running, holding blocks or awaiting a reader.
    deadline = time.time() + 10
    while True:
        state = (s.engine.pool.num_used, s.engine.has_unfinished(), len(s.async_engine._sinks),
                 s.engine.sessions.num_blocks_held)
        if state == (0, False, 0, 0):
            return
        assert time.time() < deadline, f"not idle after the run (pool used, unfinished, sinks, session blocks): {state}"
        time.sleep(0.1)


def _assert_clean(result: dict) -> None:
    assert result["totals"]["cases"] > 100 and result["stateful"]["steps"] > 0, _explain(result)
    assert result["totals"]["server_errors"] == 0, _explain(result)
    assert result["totals"]["hangs"] == 0, _explain(result)
    assert result["ok"], _explain(result)
    assert result["after_run"]["probe_matches_baseline"], _explain(result)


def test_fuzz_without_api_key(engine):
    with ServerThread(engine) as s:
        result = run_fuzz(s.url, EXAMPLES, seed=SEED, stateful_examples=SCENARIOS, timeout=60)
        _assert_clean(result)
        _assert_idle(s)
    # Every documented route was fuzzed, the ones with a body both ways.
    assert {"POST /v1/chat/completions", "POST /v1/completions", "DELETE /v1/sessions/{session_id}", "GET /v1/models",
            "GET /health", "GET /metrics", "GET /server_info", "POST /tokenize",
            "POST /detokenize"} <= set(result["operations"])
    assert result["operations"]["POST /v1/completions"]["cases"]["negative"] > 0


def test_fuzz_with_api_key(engine):
    with ServerThread(engine, api_key=KEY) as s:
        # Every case is also sent without the key first: 401 everywhere but /health.
        result = run_fuzz(s.url, EXAMPLES, api_key=KEY, seed=SEED, stateful_examples=SCENARIOS, timeout=60)
        _assert_clean(result)
        _assert_idle(s)
    assert result["undocumented_routes_without_key"]["open"] == [], _explain(result)
    assert not any(op["failure_kinds"].get("auth") for op in result["operations"].values())


# ---- the fuzzer's checks can fail ------------------------------------------------------------------------

class _Number(BaseModel):
    n: int


def test_fuzzer_reports_server_errors_and_hangs(engine):
    s = ServerThread(engine)

    @s.app.post("/sabotaged")
    async def sabotaged(body: _Number):
        if body.n % 5 == 3:
            raise RuntimeError("a bug")     # an unhandled exception: 500
        if body.n % 5 == 4:
            await asyncio.sleep(3)          # past the 1 s timeout below: a hang
        return {"n": body.n}

    with s:
        result = run_fuzz(s.url, 30, seed=SEED, stateful_examples=0, timeout=1, path_regex="^/sabotaged$")
    op = result["operations"]["POST /sabotaged"]
    assert op["server_errors"] > 0 and op["hangs"] > 0 and not result["ok"], _explain(result)
    assert {"hang", "Server error"} <= set(op["failure_kinds"]), _explain(result)
    # Reported as curl commands that reproduce them.
    assert op["first_failures"] and all(f["curl"].startswith("curl") and "/sabotaged" in f["curl"]
                                        for f in op["first_failures"])
    assert result["after_run"]["ok"]    # the rest of the server was untouched


def test_fuzzer_reports_an_open_route_and_held_blocks(engine):
    with ServerThread(engine, api_key=KEY) as s:
        # A session the fuzzer did not open keeps its blocks: the idle check must see them.
        r = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "one two three four five six seven eight nine ten eleven twelve thirteen",
                             "max_tokens": 4, "session_id": "kept"})
        assert r.status_code == 200
        # /v1/models declared public here: answering 401 without the key is then reported as an auth failure.
        result = run_fuzz(s.url, 5, api_key=KEY, seed=SEED, stateful_examples=0, path_regex="^/v1/models$",
                          public_paths=frozenset({"/health", "/v1/models"}), settle_s=1)
        assert result["operations"]["GET /v1/models"]["failure_kinds"].get("auth"), _explain(result)
        assert result["after_run"]["kvloom_kv_cache_blocks_used"] > 0 and not result["after_run"]["ok"]
        assert httpx.delete(s.url + "/v1/sessions/kept", headers={"Authorization": f"Bearer {KEY}"}).json()["deleted"]


# ---- what fuzzing found: each input is refused with a 400 naming its field ----------------------------------

@pytest.mark.parametrize("message, param", [
    # content parts: `text` not a string was a TypeError in serving.message_dicts (500)
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages.0.content"),
    # tool_calls not a list / arguments neither a string nor an object: TypeError in structured/tools.py (500)
    ({"role": "assistant", "content": None, "tool_calls": 5}, "messages.0.tool_calls"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}, "messages.0.tool_calls"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "messages.0.tool_calls"),
])
def test_malformed_messages_are_400(engine, message, param):
    with ServerThread(engine) as s:
        for path in ("/v1/chat/completions", "/tokenize"):
            r = httpx.post(s.url + path, json={"messages": [message], "max_tokens": 2})
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["param"].startswith(param), r.text


def test_well_formed_tool_calls_and_parts_still_work(engine):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with ServerThread(engine) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("session_id", ["a/b", ".", ".."])
def test_session_ids_delete_cannot_name_are_refused(engine, session_id):
    # Found: a session "áà/..." kept its KV blocks and DELETE /v1/sessions/{id} answered 404 for it ("/" splits
    # the path; "." and ".." are collapsed by clients), so nothing could release them before the TTL.
    with ServerThread(engine) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2, "session_id": session_id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "session_id", r.text
        assert s.engine.sessions.num_blocks_held == 0


def test_a_session_id_with_spaces_and_unicode_can_be_closed(engine):
    sid = "agent 7 · ünïcode"
    with ServerThread(engine) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "one two three four five six seven eight nine "
                                                        "ten eleven twelve thirteen fourteen", "max_tokens": 2,
                                                        "session_id": sid})
        assert r.status_code == 200 and s.engine.sessions.num_blocks_held > 0
        assert httpx.delete(s.url + "/v1/sessions/" + urllib.parse.quote(sid, safe="")).json()["deleted"]
        assert s.engine.sessions.num_blocks_held == 0
