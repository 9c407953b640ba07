"""Several models behind one server: dispatch by name, load on demand, idle unload, LRU, routes, feedback."""
import json
import math
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvloom.router.routes import RouteSpec
from server_harness import MultiServerThread


@pytest.fixture(scope="module")
def dirs(tiny_model_dir):
    return {"small": tiny_model_dir("llama"), "big": tiny_model_dir("qwen2")}


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def _generated(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "kvloom_generation_tokens":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["model_name"]] = s.value
    return out


def _route_counts(server) -> dict[tuple[str, str], float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.labels["route"], s.labels["model"]): s.value for fam in text_string_to_metric_families(text)
            if fam.name == "kvloom_route" for s in fam.samples if s.name.endswith("_total")}


def test_requests_go_to_their_model_and_metrics_are_labelled(dirs):
    with MultiServerThread(dirs) as server:
        client = _client(server)
        listed = {m.id: m for m in client.models.list().data}
        assert {"small", "big", "auto"} <= set(listed)
        kw = dict(prompt="The with statement", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        before = _generated(server)
        a = client.completions.create(model="small", **kw)
        mid = _generated(server)
        b = client.completions.create(model="big", **kw)
        after = _generated(server)
        assert (a.model, b.model) == ("small", "big")
        assert a.choices[0].text != b.choices[0].text          # two different random models
        assert mid["small"] - before.get("small", 0) == 12 and "big" not in before
        assert after["big"] == 12 and after["small"] == mid["small"]
        chat = client.chat.completions.create(model="big", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.model == "big"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", **kw)
        default = httpx.post(server.url + "/v1/completions", json={"prompt": "The with statement", "max_tokens": 12,
                                                                  "temperature": 0, "ignore_eos": True}).json()
        assert default["model"] == "small" and default["choices"][0]["text"] == a.choices[0].text
        assert httpx.post(server.url + "/tokenize", json={"model": "big", "prompt": "x y"}).status_code == 200


def test_load_on_demand_and_idle_unload_under_traffic(dirs):
    with MultiServerThread(dirs, idle_seconds=1.0) as server:
        client = _client(server)
        assert set(server.registry.loaded()) == {"small"}       # the default model is loaded at start
        failures, done = [], []
        stop = time.time() + 7

        def steady():      # small is busy all along: never idle, never unloaded
            while time.time() < stop:
                try:
                    client.completions.create(model="small", prompt="steady", max_tokens=4, temperature=0)
                    done.append("small")
                except Exception as e:   # noqa: BLE001 - any failure is the test's failure
                    failures.append(repr(e))

        def bursts():      # big in bursts with 2.5 s gaps: unloaded in each gap, loaded again by the next burst
            while time.time() < stop:
                for _ in range(3):
                    try:
                        client.completions.create(model="big", prompt="burst", max_tokens=4, temperature=0)
                        done.append("big")
                    except Exception as e:   # noqa: BLE001
                        failures.append(repr(e))
                time.sleep(2.5)

        threads = [threading.Thread(target=steady) for _ in range(2)] + [threading.Thread(target=bursts)
                                                                           for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        info = httpx.get(server.url + "/server_info").json()
        assert info["loads"] >= 3 and info["unloads"] >= 1, info   # small once, big at least twice
        assert done.count("big") >= 6 and done.count("small") > 0
        time.sleep(2.0)
        assert server.registry.loaded() == {}      # both idle past 1 s: unloaded
        r = client.completions.create(model="small", prompt="back", max_tokens=3, temperature=0)
        assert r.model == "small"


def test_max_loaded_models_evicts_least_recently_used_idle(dirs):
    with MultiServerThread(dirs, max_loaded=1) as server:
        client = _client(server)
        for name in ("big", "small", "big"):
            assert client.completions.create(model=name, prompt="x", max_tokens=3, temperature=0).model == name
            assert set(server.registry.loaded()) == {name}
        # Both at once with room for one: one waits for the other to finish; neither fails.
        results, failures = [], []

        def ask(name):
            try:
                results.append(client.completions.create(model=name, prompt="y", max_tokens=8, temperature=0).model)
            except Exception as e:   # noqa: BLE001
                failures.append(repr(e))
        threads = [threading.Thread(target=ask, args=(n,)) for n in ("small", "big", "small", "big")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == [] and sorted(results) == ["big", "big", "small", "small"]
        assert len(server.registry.loaded()) == 1


def test_cascade_route_escalates_below_threshold(dirs):
    routes = [RouteSpec("never", "cascade", {"threshold": "-inf"}), RouteSpec("always", "cascade", {"threshold": "inf"}),
              RouteSpec("mid", "cascade", {"threshold": "-3.0"}),
              RouteSpec("ent", "cascade", {"threshold": "-1.0", "measure": "neg_entropy"})]
    with MultiServerThread(dirs, routes=routes) as server:
        ask = {"prompt": "The with statement", "max_tokens": 6, "temperature": 0}
        never = httpx.post(server.url + "/v1/completions", json={**ask, "model": "never"}, timeout=60).json()
        assert never["kvloom"]["route"]["model"] == "small" and never["model"] == "small"
        assert never["choices"][0]["logprobs"] is None      # asked for by the cascade, not by the client
        always = httpx.post(server.url + "/v1/completions", json={**ask, "model": "always"}, timeout=60).json()
        assert always["kvloom"]["route"]["model"] == "big" and always["model"] == "big"
        assert "escalated" in always["kvloom"]["route"]["reason"]
        # The mid threshold: escalated exactly when small's mean logprob is below it.
        small = httpx.post(server.url + "/v1/completions", json={**ask, "model": "small", "logprobs": 0}).json()
        lps = small["choices"][0]["logprobs"]["token_logprobs"]
        mid = httpx.post(server.url + "/v1/completions", json={**ask, "model": "mid"}, timeout=60).json()
        assert mid["kvloom"]["route"]["model"] == ("big" if sum(lps) / len(lps) < -3.0 else "small")
        # Entropy: escalated exactly when minus small's mean top-5 entropy is below the threshold.
        top = httpx.post(server.url + "/v1/completions", json={**ask, "model": "small", "logprobs": 5}).json()
        steps = [list(d.values()) for d in top["choices"][0]["logprobs"]["top_logprobs"]]
        neg_entropy = -sum(-sum(math.exp(v) * v for v in s) for s in steps) / len(steps)
        ent = httpx.post(server.url + "/v1/completions", json={**ask, "model": "ent"}, timeout=60).json()
        assert ent["kvloom"]["route"]["model"] == ("big" if neg_entropy < -1.0 else "small")
        assert ent["choices"][0]["logprobs"] is None
        chat = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          json={"model": "always", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert chat.json()["kvloom"]["route"]["model"] == "big"
        streamed = httpx.post(server.url + "/v1/completions", json={**ask, "model": "always", "stream": True})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
        counts = _route_counts(server)
        assert counts[("never", "small")] == 1 and counts[("always", "big")] == 2
        assert sum(v for (r, _), v in counts.items() if r == "ent") == 1


def test_bandit_route_and_feedback(dirs):
    with MultiServerThread(dirs, routes=[RouteSpec("auto", "bandit", {"seed": "3"})]) as server:
        ask = {"model": "auto", "prompt": "Compound statements", "max_tokens": 4, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=ask, timeout=60).json()
        route = r["kvloom"]["route"]
        assert route["policy"] == "bandit" and route["model"] in ("small", "big") and r["model"] == route["model"]
        fb = httpx.post(server.url + "/v1/feedback", json={"id": r["id"], "score": 0.9})
        assert fb.status_code == 200 and fb.json()["model"] == route["model"]
        assert httpx.post(server.url + "/v1/feedback", json={"id": r["id"], "score": 0.9}).status_code == 404
        assert httpx.post(server.url + "/v1/feedback", json={"id": "cmpl-unknown", "score": 0.5}).status_code == 404
        r2 = httpx.post(server.url + "/v1/completions", json=ask, timeout=60).json()
        for bad in (2.0, -0.1, "high", None, True):
            resp = httpx.post(server.url + "/v1/feedback", json={"id": r2["id"], "score": bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "score", bad
        assert httpx.post(server.url + "/v1/feedback", content=b"not json").status_code == 400
        with httpx.stream("POST", server.url + "/v1/completions", json={**ask, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["x-kvloom-route-policy"] == "bandit"
            text = "".join(s.iter_text())
        assert "[DONE]" in text
        stream_id = json.loads(text.split("data: ", 2)[1].split("\n")[0])["id"]
        assert httpx.post(server.url + "/v1/feedback", json={"id": stream_id, "score": 0}).status_code == 200
        assert sum(_route_counts(server).values()) == 3


def test_a_model_that_cannot_load_fails_its_requests_only(dirs, tmp_path):
    with MultiServerThread({"small": dirs["small"], "broken": str(tmp_path / "missing")}) as server:
        r = httpx.post(server.url + "/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        ok = httpx.post(server.url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_guards_every_route_of_the_front(dirs):
    with MultiServerThread(dirs, api_key="k") as server:
        ask = {"model": "big", "prompt": "x", "max_tokens": 2}
        for method, path, body in (("POST", "/v1/completions", ask), ("POST", "/v1/feedback", {"id": "a", "score": 1}),
                                   ("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("GET", "/server_info", None), ("POST", "/tokenize", {"prompt": "x"})):
            assert httpx.request(method, server.url + path, json=body).status_code == 401, path
        assert httpx.get(server.url + "/health").status_code == 200
        ok = httpx.post(server.url + "/v1/completions", json=ask, headers={"Authorization": "Bearer k"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["model"] == "big"
