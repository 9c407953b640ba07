"""Server failure modes a new user hit: dropped streams, a dead engine loop, unsupported OpenAI fields, auth."""
import asyncio
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_harness import ServerThread, slowed, tiny_engine

MSGS = [{"role": "user", "content": "Explain the with statement."}]


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


# ---- 6 streams dropped after 2 lines: nothing stays running -----------------------------------------------

def _drop_after_two_lines(url: str, i: int, n: int = 1) -> None:
    body = {"model": "tiny", "prompt": f"Story number {i}:", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "n": n}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line:
                    got += 1
                    if got == 2:
                        break   # leaving the with blocks closes the connection mid-stream


@pytest.mark.parametrize("n", [1, 2])
def test_six_dropped_streams_leave_nothing_running(tiny_model_dir, n):
    # Slowed steps (a real model's pace): all six are mid-generation when their clients go.
    with ServerThread(slowed(tiny_engine(tiny_model_dir("llama")), 0.02)) as s:
        threads = [threading.Thread(target=_drop_after_two_lines, args=(s.url, i, n)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        deadline = time.time() + 10
        while True:
            g = _gauges(s.url)
            state = (g["kvloom_num_requests_running"], g["kvloom_num_requests_waiting"],
                     g["kvloom_kv_cache_blocks_used"], s.engine.pool.num_used, s.engine.has_unfinished(),
                     len(s.async_engine._sinks))
            if state == (0, 0, 0, 0, False, 0):
                break
            assert time.time() < deadline, f"still in use (running, waiting, blocks, pool, unfinished, sinks): {state}"
            time.sleep(0.1)
        assert s.metrics.requests.labels(outcome="abort")._value.get() == 6   # one per engine request (n samples)
        # and the server still serves
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_multi_prompt_stream_dropped_leaves_nothing_running(tiny_model_dir):
    with ServerThread(slowed(tiny_engine(tiny_model_dir("llama")), 0.02)) as s:
        body = {"model": "tiny", "prompt": ["One:", "Two:", "Three:"], "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", s.url + "/v1/completions", json=body) as r:
                next(line for line in r.iter_lines() if line)
        deadline = time.time() + 10
        while s.engine.has_unfinished() or s.engine.pool.num_used:
            assert time.time() < deadline, "multi-prompt stream left requests running"
            time.sleep(0.05)


# ---- the engine loop dies: everything queued fails promptly ------------------------------------------------

def test_engine_death_fails_every_queued_command(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"))
    real_step = engine.step
    gate = threading.Event()
    stuck = threading.Event()        # the engine thread is inside the dying step: it takes no command now
    stream_lines: list[str] = []

    def dying_step():
        if stream_lines:             # once the streaming request has sent text, the next step dies
            stuck.set()
            gate.wait(30)
            raise RuntimeError("boom: a bug in the engine")
        return real_step()
    engine.step = dying_step

    with ServerThread(engine) as s:
        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as h:

                async def streaming():      # in the engine when it dies
                    body = {"model": "tiny", "prompt": "stream", "max_tokens": 50, "stream": True, "ignore_eos": True}
                    async with h.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line:
                                stream_lines.append(line)
                stream_task = asyncio.create_task(streaming())
                deadline = time.time() + 20
                while not stuck.is_set():
                    assert time.time() < deadline, "the engine never entered the dying step"
                    await asyncio.sleep(0.01)
                # The loop is stuck in the dying step: these commands wait in its queue.
                queued = [asyncio.create_task(h.post("/v1/completions", json={"model": "tiny", "prompt": "queued"})),
                          asyncio.create_task(h.post("/v1/chat/completions",
                                                     json={"model": "tiny", "messages": MSGS, "stream": True})),
                          asyncio.create_task(h.delete("/v1/sessions/agent-1"))]
                while s.async_engine._commands.qsize() < 3:
                    assert time.time() < deadline, "the three commands never reached the engine's queue"
                    await asyncio.sleep(0.01)
                gate.set()
                t0 = time.time()
                responses = await asyncio.wait_for(asyncio.gather(*queued), 10)
                await asyncio.wait_for(stream_task, 10)
                took = time.time() - t0
                after = [await h.post("/v1/completions", json={"model": "tiny", "prompt": "late"}),
                         await h.delete("/v1/sessions/agent-1")]
                return responses, stream_lines, after, took, await h.get("/health")

        responses, stream_lines, after, took, health = asyncio.run(run())
        assert took < 5
        for r in responses + after:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_dead" and "restart" in r.json()["error"]["message"]
        assert '"error"' in stream_lines[-1] and "boom" in stream_lines[-1]
        assert health.status_code == 503 and "boom" in health.json()["error"]["message"]
        assert not s.async_engine.is_alive


# ---- OpenAI fields kvloom does not implement: 400 naming the field, not silently ignored -------------------
# (response_format, tools, guided_* and structured_outputs are implemented: tests/test_tool_calls.py and
# tests/test_structured_outputs.py; use_beam_search and length_penalty: tests/test_server_search.py)

CHAT_UNSUPPORTED = [
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", {"name": "f"}),
    ("logit_bias", {"5": 100}),
    ("prediction", {"type": "content", "content": "x"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
    ("min_tokens", 5),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama"), max_model_len=200)) as s:
        yield s


@pytest.mark.parametrize("field,value", CHAT_UNSUPPORTED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CHAT_UNSUPPORTED)])
def test_unsupported_chat_field_is_400(server, field, value):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": MSGS, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error" and field in err["message"]
    if field not in ("suffix",):   # the same on completions
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_unsupported_fields_through_the_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    cases = [
        ("logit_bias", lambda: client.chat.completions.create(model="tiny", messages=MSGS, logit_bias={"5": -100})),
        ("suffix", lambda: client.completions.create(model="tiny", prompt="def f(", suffix="return 1")),
        ("best_of", lambda: client.completions.create(model="tiny", prompt="x", n=2, best_of=1)),   # best_of < n
    ]
    for field, call in cases:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == field, (field, e.value.body)


def test_harmless_and_default_fields_are_accepted(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False,
        service_tier="auto", response_format={"type": "text"}, tool_choice="none", parallel_tool_calls=True,
        logit_bias={}, modalities=["text"], extra_body={"best_of": 1, "use_beam_search": False})
    assert r.choices
    c = client.completions.create(model="tiny", prompt="x", max_tokens=2, suffix=None, best_of=1, user="u")
    assert c.choices


# ---- the API key guards every route but /health (and /metrics with --public-metrics) -----------------------

ROUTES = [("GET", "/v1/models", None),
          ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
          ("POST", "/v1/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 2}),
          ("DELETE", "/v1/sessions/s1", None),
          ("POST", "/tokenize", {"prompt": "hello"}),
          ("POST", "/detokenize", {"tokens": [5, 6]}),
          ("GET", "/server_info", None),
          ("GET", "/metrics", None),
          ("GET", "/dashboard/stats", None),
          ("GET", "/openapi.json", None),
          ("GET", "/docs", None),
          ("GET", "/docs/oauth2-redirect", None),
          ("GET", "/redoc", None),
          ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
          ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
          ("POST", "/v1/files", None),
          ("GET", "/v1/files", None),
          ("GET", "/v1/files/f1", None),
          ("GET", "/v1/files/f1/content", None),
          ("DELETE", "/v1/files/f1", None),
          ("POST", "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": "f1"}),
          ("GET", "/v1/fine_tuning/jobs", None),
          ("GET", "/v1/fine_tuning/jobs/j1", None),
          ("GET", "/v1/fine_tuning/jobs/j1/events", None),
          ("POST", "/v1/fine_tuning/jobs/j1/cancel", None)]
# Past auth, a server without LoRA or fine-tuning refuses these.
NOT_200 = {"/v1/load_lora_adapter": 400, "/v1/unload_lora_adapter": 400,
           **{p: 400 for _, p, _ in ROUTES if p.startswith(("/v1/files", "/v1/fine_tuning"))}}
IDS = {"/s1": "/{session_id}", "/f1": "/{file_id}", "/j1": "/{job_id}"}


def _template(path: str) -> str:
    for concrete, template in IDS.items():
        path = path.replace(concrete, template)
    return path
PUBLIC = {"/health", "/", "/dashboard", "/static/{name}"}


def _route_paths(routes, prefix=""):
    for r in routes:
        if hasattr(r, "path"):
            yield prefix + r.path
        else:   # FastAPI >= 0.165 keeps an included router whole (its routes already carry its own prefix)
            yield from _route_paths(r.original_router.routes, prefix + r.include_context.prefix)


def test_every_route_is_in_the_auth_test(tiny_model_dir):
    # A route added later must be added to ROUTES (or PUBLIC, deliberately): none escapes the test below.
    s = ServerThread(tiny_engine(tiny_model_dir("llama")), api_key="k")
    paths = set(_route_paths(s.app.routes))
    assert paths - PUBLIC == {_template(p) for _, p, _ in ROUTES}


def test_api_key_guards_every_route(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama")), api_key="sk-secret") as s:
        with httpx.Client(base_url=s.url, timeout=30) as h:
            for method, path, body in ROUTES:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
                    r = h.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                r = h.request(method, path, json=body, headers={"Authorization": "Bearer sk-secret"})
                assert r.status_code == NOT_200.get(path, 200), (method, path, r.text)
            assert h.get("/health").status_code == 200
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-secret", max_retries=0)
        assert [c for c in ok.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True) if c.choices]


def test_public_metrics_and_one_key_per_tenant(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama")), api_key=("sk-a", "sk-b"), public_metrics=True) as s:
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert httpx.get(s.url + "/server_info").status_code == 401
        for key in ("sk-a", "sk-b"):
            assert httpx.get(s.url + "/server_info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(s.url + "/server_info", headers={"Authorization": "Bearer sk-"}).status_code == 401


def test_keys_are_compared_in_constant_time_all_of_them(tiny_model_dir, monkeypatch):
    # Timing must not tell which key (or how much of one) matched: every key goes through compare_digest,
    # whether the first one matched or none did.
    import kvloom.server.app as app_module
    real = app_module.secrets.compare_digest
    calls = []

    def spy(a, b):
        calls.append(b)
        return real(a, b)
    monkeypatch.setattr(app_module.secrets, "compare_digest", spy)
    with ServerThread(tiny_engine(tiny_model_dir("llama")), api_key=("sk-a", "sk-b", "sk-c")) as s:
        for given in ("Bearer sk-a", "Bearer sk-c", "Bearer nope"):
            calls.clear()
            httpx.get(s.url + "/v1/models", headers={"Authorization": given})
            assert calls == [b"Bearer sk-a", b"Bearer sk-b", b"Bearer sk-c"]


def test_a_client_leaving_while_queued_frees_its_place_before_its_turn(tiny_model_dir):
    # One seat, held ~100 steps by a long request; two more queue behind it and their clients give up. Their
    # requests must be aborted while the long one still runs, not prefilled when their turn comes.
    engine = slowed(tiny_engine(tiny_model_dir("llama"), max_num_seqs=1), 0.05)
    with ServerThread(engine, max_waiting_requests=4) as s:
        url = s.url + "/v1/completions"
        long_done = threading.Event()

        def long_request():
            httpx.post(url, json={"model": "tiny", "prompt": "hello", "max_tokens": 100, "ignore_eos": True},
                       timeout=60)
            long_done.set()
        threading.Thread(target=long_request).start()
        while not engine.scheduler.running:
            time.sleep(0.01)
        for stream in (False, True):
            with pytest.raises(httpx.TimeoutException):   # queued behind it: the client gives up
                httpx.post(url, json={"model": "tiny", "prompt": "world", "max_tokens": 50, "stream": stream},
                           timeout=0.3)
        aborted = s.metrics.requests.labels(outcome="abort")
        while aborted._value.get() < 2 and not long_done.is_set():
            time.sleep(0.02)
        assert aborted._value.get() == 2 and not long_done.is_set(), "queued requests were kept for their turn"
        assert long_done.wait(60)
