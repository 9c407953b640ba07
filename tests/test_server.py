"""The OpenAI-compatible server, through the official openai client."""
import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_harness import ServerThread, slowed, tiny_engine


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama"), max_model_len=200)) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _no_leak(server, timeout=5.0):
    pool = server.engine.pool
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pool.num_free == pool.num_blocks and not server.engine.has_unfinished():
            return
        time.sleep(0.05)
    raise AssertionError(f"{pool.num_blocks - pool.num_free} KV blocks still in use")


MSGS = [{"role": "user", "content": "Explain the with statement."}]


def test_chat_stream_equals_non_stream(client, server):
    kw = dict(model="tiny", messages=MSGS, max_tokens=30, temperature=0.8, seed=11)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    _no_leak(server)


def test_completion_usage_is_exact(client, server):
    prompt = "The grammar of Python"
    n_prompt = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["count"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == n_prompt + 9
    ids = server.engine.tokenizer.encode(prompt)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == prompt


def test_seed_reproducible_and_n2(client):
    kw = dict(model="tiny", prompt="Compound statements", max_tokens=16, temperature=1.0, seed=5, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text != a.choices[1].text
    streamed = list(client.completions.create(**kw, stream=True))
    texts = {0: "", 1: ""}
    for ch in streamed:
        for c in ch.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in a.choices]


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt="Lambda", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[5:8]
    r = client.completions.create(model="tiny", prompt="Lambda", max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:base.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny", prompt="Lambda", max_tokens=30, temperature=0, stop=[stop],
                                  stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_logprobs_and_echo(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    c = client.completions.create(model="tiny", prompt="Yield", max_tokens=4, temperature=0, logprobs=2, echo=True)
    assert c.choices[0].text.startswith("Yield")
    assert len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens


def test_token_id_prompts(client):
    one = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    two = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text == one.choices[0].text


def test_32_concurrent_streams_equal_single_outputs(server):
    prompts = [f"Topic number {i}: the {['for', 'while', 'try', 'class'][i % 4]} statement" for i in range(32)]
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    single = [sync.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
              for p in prompts]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        async def one(p):
            text = ""
            async for ch in await aclient.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                                             stream=True):
                text += ch.choices[0].text if ch.choices else ""
            return text
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == single
    _no_leak(server)


def test_client_disconnect_frees_blocks(tiny_model_dir):
    with ServerThread(slowed(tiny_engine(tiny_model_dir("llama")))) as s:
        aborted = lambda: s.metrics.requests.labels(outcome="abort")._value.get()  # noqa: E731
        body = {"model": "tiny", "prompt": "Long story:", "max_tokens": 150, "ignore_eos": True}
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                assert any(next(lines).startswith("data:") for _ in range(6))
                assert s.engine.pool.num_free < s.engine.pool.num_blocks
        _no_leak(s)
        assert aborted() == 1

        async def walk_away():  # non-streaming: the client gives up while the engine works
            async with httpx.AsyncClient(timeout=30) as h:
                task = asyncio.create_task(h.post(s.url + "/v1/completions", json=body))
                while not s.engine.has_unfinished():
                    await asyncio.sleep(0.01)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        asyncio.run(walk_away())
        _no_leak(s)
        assert aborted() == 2


@pytest.mark.parametrize("body,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"max_tokens": "many"}, "max_tokens"),
    ({"n": 0}, "n"), ({"messages": []}, "messages"),
])
def test_invalid_fields_are_400_with_the_field(server, client, body, param):
    full = {"model": "tiny", "messages": MSGS, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=full)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"


def test_prompt_too_long_is_400(server, client):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [5] * 250})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", extra_body={"top_k": -5})
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices
    _no_leak(server)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200

    def scrape():
        text = httpx.get(server.url + "/metrics").text
        return {s.name + str(sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
    before = scrape()
    client.completions.create(model="tiny", prompt="metrics", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = scrape()
    key = "kvloom_requests_total[('outcome', 'success')]"
    assert after[key] == before.get(key, 0) + 1
    assert after["kvloom_generation_tokens_total[]"] >= before.get("kvloom_generation_tokens_total[]", 0) + 5
    assert after["kvloom_time_to_first_token_seconds_count[]"] > before.get(
        "kvloom_time_to_first_token_seconds_count[]", 0)
    assert "kvloom_kv_cache_usage_ratio[]" in after and "kvloom_num_requests_waiting[]" in after


def test_api_key_required(tiny_model_dir):
    with ServerThread(tiny_engine(tiny_model_dir("llama")), api_key="sk-secret") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-secret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_backpressure_503(tiny_model_dir):
    # Slowed steps: one running request takes ~1 s, so the other eleven must queue.
    with ServerThread(slowed(tiny_engine(tiny_model_dir("llama"), max_num_seqs=1)), max_waiting_requests=2) as s:
        async def run():
            async with httpx.AsyncClient(timeout=60) as h:
                body = {"model": "tiny", "prompt": "wait", "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(*(h.post(s.url + "/v1/completions", json=body) for _ in range(12)))
        codes = [r.status_code for r in asyncio.run(run())]
        rejected = [r for r in codes if r == 503]
        assert rejected and 200 in codes and set(codes) <= {200, 503}
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 2})
        assert r.status_code == 200


def test_cached_tokens_in_usage_and_sessions(server, client):
    system = {"role": "system", "content": "You are a careful assistant. " * 5}
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=[system, {"role": "user", "content": q}], max_tokens=3, temperature=0)
    ask("first question")
    second = ask("second question")
    assert second.usage.prompt_tokens_details.cached_tokens >= 32  # the shared system prompt
    r = client.completions.create(model="tiny", prompt="Agent step one:", max_tokens=4, temperature=0,
                                  extra_body={"session_id": "agent-7"})
    assert r.choices[0].text is not None
    first = httpx.delete(server.url + "/v1/sessions/agent-7").json()
    assert first["deleted"] is True
    assert httpx.delete(server.url + "/v1/sessions/agent-7").json()["deleted"] is False
    _no_leak(server)


def test_cache_salt_keeps_tenants_prefix_hits_apart(server, client):
    """vLLM's cache_salt: a tenant's cached prefix is never a hit (nor a timing signal) for another tenant."""
    system = {"role": "system", "content": "Tenant policy text that is long enough to fill blocks. " * 4}
    ask = lambda salt: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=[system, {"role": "user", "content": "hello"}], max_tokens=2, temperature=0,
        extra_body={"cache_salt": salt}).usage.prompt_tokens_details.cached_tokens
    assert ask("tenant-a") == 0
    assert ask("tenant-b") == 0          # same prompt, other salt: nothing shared
    assert ask("tenant-a") >= 32         # its own blocks are
    _no_leak(server)
