"""Every per-request limit of `kvloom serve` (kvloom/server/limits.py) answers a clear 4xx naming its flag, and
refusing a request costs nothing: no slot, no KV block, the next request is served."""
import threading

import httpx
import pytest

from kvloom.server.limits import ServerLimits
from server_harness import ServerThread, slowed, tiny_engine

LIMITS = ServerLimits(max_request_bytes=4000, max_prompt_tokens=40, max_tokens=16, max_n=2, max_logprobs=2,
                      max_stop_strings=2, max_stop_length=5, max_streams_per_key=1)
KEYS = {"a": {"Authorization": "Bearer sk-a"}, "b": {"Authorization": "Bearer sk-b"}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # Slowed steps: a stream of 100 tokens stays open long enough to hold its slot while others knock.
    with ServerThread(slowed(tiny_engine(tiny_model_dir("llama")), 0.01), api_key=("sk-a", "sk-b"),
                      limits=LIMITS) as s:
        yield s


def _post(server, path, body, key="a", **kw):
    return httpx.post(server.url + path, json=body, headers=KEYS[key], timeout=30, **kw)


CMPL = {"model": "tiny", "prompt": "hello there", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("path,extra,status,param,flag", [
    ("/v1/completions", {"n": 3}, 400, "n", "--max-n"),
    ("/v1/chat/completions", {"n": 3}, 400, "n", "--max-n"),
    ("/v1/completions", {"max_tokens": 17}, 400, "max_tokens", "--max-tokens-limit"),
    ("/v1/chat/completions", {"max_completion_tokens": 17}, 400, "max_completion_tokens", "--max-tokens-limit"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}, 400, "top_logprobs", "--max-logprobs"),
    ("/v1/completions", {"logprobs": 3}, 400, "logprobs", "--max-logprobs"),
    ("/v1/completions", {"stop": ["a", "b", "c"]}, 400, "stop", "--max-stop-strings"),
    ("/v1/chat/completions", {"stop": "abcdef"}, 400, "stop", "--max-stop-length"),
    ("/v1/completions", {"prompt": "word " * 60}, 400, "prompt", "--max-prompt-tokens"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, None, "--max-request-bytes"),
])
def test_each_limit_is_a_clear_4xx(server, path, extra, status, param, flag):
    r = _post(server, path, {**(CMPL if "/completions" == path[3:] else CHAT), **extra})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and flag in err["message"]
    # At the limit itself, the request is served.
    ok = _post(server, path, {**(CMPL if "/completions" == path[3:] else CHAT)})
    assert ok.status_code == 200


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():   # no Content-Length: the server counts the bytes as they come
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'
    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=30,
                   headers={**KEYS["a"], "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_streams_are_limited_per_key_and_slots_come_back(server):
    body = {**CMPL, "max_tokens": 16, "ignore_eos": True, "stream": True}
    opened, release = threading.Event(), threading.Event()

    def hold_a_stream():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=KEYS["a"], timeout=30) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                opened.set()
                release.wait(30)
                break
    t = threading.Thread(target=hold_a_stream)
    t.start()
    assert opened.wait(30)
    second = _post(server, "/v1/completions", body, "a")
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_streams"
    assert _post(server, "/v1/completions", {**body, "n": 3}, "a").status_code == 400   # refused before a slot
    other = _post(server, "/v1/completions", body, "b")          # another tenant is not affected
    assert other.status_code == 200 and "[DONE]" in other.text
    assert _post(server, "/v1/completions", {**body, "stream": False}, "a").status_code == 200   # not a stream
    release.set()
    t.join(30)
    again = _post(server, "/v1/completions", body, "a")            # the dropped stream gave its slot back
    assert again.status_code == 200 and "[DONE]" in again.text
    assert server.engine.pool.num_used == 0 and not server.engine.has_unfinished()
