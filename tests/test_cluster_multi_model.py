"""Several models on the Ray cluster (`kvloom serve --model a=P --model b=Q --instances 2`), in a module of its own
with its own local Ray: each model has its own two instances behind its own ClusterEngine, requests for a name are
answered by that model's instances only (the tokens of that model alone), a small concurrent load fails nothing,
metrics are labelled per model, and idle unload / load on demand stop and start a model's actors."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.server.cluster_serving import ClusterOptions
from server_harness import MultiServerThread

MAX_TOKENS = 8
PROMPTS = random_prompts(3, [9, 14, 21], seed=41)


@pytest.fixture(scope="module")
def dirs(tiny_model_dir):
    return {"small": tiny_model_dir("llama"), "big": tiny_model_dir("qwen2")}


@pytest.fixture(scope="module")
def alone(dirs):
    """Each model's greedy texts for PROMPTS, from that model alone (offline, in this process)."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for name, d in dirs.items():
        llm = LLM(d, kv_cache_memory=4 << 20)
        out[name] = [r.text for r in llm.generate(PROMPTS, params, use_tqdm=False)]
        del llm
    assert out["small"] != out["big"]          # two different random models
    return out


@pytest.fixture(scope="module")
def server(dirs, alone):
    # Room for both models' two one-thread instances (Ray's CPUs are a count, not cores).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    # Idle unload is armed but far off; the last test brings it near (the reaper reads it every round).
    s = MultiServerThread(dirs, idle_seconds=3600.0, kv_cache_memory=4 << 20, max_num_seqs=8,
                          cluster=ClusterOptions(instances=2, threads_per_instance=1, migration=False))
    with s:
        yield s
    ray.shutdown()


def ask(server, name: str, k: int) -> dict:
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": name, "prompt": PROMPTS[k], "max_tokens": MAX_TOKENS, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def clusters(server, name: str) -> list:
    """Every ClusterEngine the server has made for the model (one per load)."""
    return [m.async_engine for n, m in server.loads if n == name]


def placed_ids(server, name: str) -> set[str]:
    return {rid for c in clusters(server, name) for rid, _ in c.placements}


def test_each_name_is_answered_by_its_own_instances(server, alone):
    listed = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"small", "big"} <= listed
    ids = {"small": [], "big": []}
    for k in range(len(PROMPTS)):
        for name in ("small", "big"):
            r = ask(server, name, k)
            assert r["model"] == name and r["choices"][0]["text"] == alone[name][k], (name, k)
            ids[name].append(r["id"])
    # Each request was placed by its model's own front only: requests never cross between models.
    for name, other in (("small", "big"), ("big", "small")):
        assert set(ids[name]) <= placed_ids(server, name)
        assert not set(ids[name]) & placed_ids(server, other)
    loaded = server.registry.loaded()
    assert [c.num_instances for c in (loaded["small"].async_engine, loaded["big"].async_engine)] == [2, 2]
    pids = [i["pid"] for n in ("small", "big") for i in loaded[n].async_engine.info()]
    assert len(set(pids)) == 4                   # four actor processes: two per model
    info = httpx.get(server.url + "/server_info").json()
    assert [len(info["loaded"][n]["instances"]) for n in ("small", "big")] == [2, 2]


def _generated(server) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        if fam.name == "kvloom_generation_tokens":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["model_name"]] = s.value
    return out


def _concurrently(server, alone, names: list[str]) -> list[str]:
    """One request per name, all at once; returns the failures (a wrong text is one)."""
    failures = []

    def one(i, name):
        try:
            k = i % len(PROMPTS)
            text = ask(server, name, k)["choices"][0]["text"]
            if text != alone[name][k]:
                failures.append(f"{name} prompt {k}: {text!r} != {alone[name][k]!r}")
        except Exception as e:   # noqa: BLE001 - any failure is the test's failure
            failures.append(f"{name}: {e!r}")
    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def test_concurrent_load_fails_nothing_and_metrics_are_labelled_per_model(server, alone):
    before = _generated(server)
    names = ["small", "big"] * 5
    assert _concurrently(server, alone, names) == []
    after = _generated(server)
    for name in ("small", "big"):
        assert after[name] - before.get(name, 0) == names.count(name) * MAX_TOKENS, (before, after)
    text = httpx.get(server.url + "/metrics").text
    up = {(s.labels["model_name"], s.labels["instance"]) for fam in text_string_to_metric_families(text)
          if fam.name == "kvloom_instance_up" for s in fam.samples}
    assert up == {("small", "0"), ("small", "1"), ("big", "0"), ("big", "1")}


def test_idle_unload_stops_a_models_actors_and_a_request_starts_them_again(server, alone):
    old = {n: server.registry.loaded()[n].async_engine for n in ("small", "big")}
    old_actors = [a for c in old.values() for a in c.actors]
    old_groups = [c._placement_group for c in old.values()]
    loads_before, unloads_before = len(server.loads), server.registry.unloads
    server.registry.idle_seconds = 1.0
    deadline = time.time() + 60
    # A model leaves loaded() as its unload starts; the count moves once its shutdown (actors killed) is done.
    while server.registry.loaded() or server.registry.unloads < unloads_before + 2:
        assert time.time() < deadline, "the idle models were never unloaded"
        time.sleep(0.2)
    server.registry.idle_seconds = 3600.0
    for a in old_actors:          # the actors are gone, and so are their placement groups (their CPUs)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.ready.remote(), timeout=30)
    assert all(ray.util.placement_group_table(g)["state"] == "REMOVED" for g in old_groups)
    # Requests for both, at once, while neither is loaded: each waits for its model's new instances.
    assert _concurrently(server, alone, ["small", "big", "big", "small"]) == []
    assert len(server.loads) == loads_before + 2
    assert sorted(n for n, _ in server.loads[loads_before:]) == ["big", "small"]
    new = server.registry.loaded()
    assert all(len(new[n].async_engine.actors) == 2 and new[n].async_engine is not old[n] for n in ("small", "big"))
