"""LoRA adapters over the Ray cluster (kvloom/cluster): every instance loads the adapters given at start, so an
adapter request dispatches, migrates and resumes after its instance dies like any other, with its tokens."""
from __future__ import annotations

import asyncio
import time

import pytest
import ray

from conftest import make_adapter, random_prompts
from kvloom import SamplingParams
GREEDY = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    from kvloom.cluster.front import ClusterEngine
    from kvloom.config import EngineConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = tiny_model_dir("llama")
    adapter = make_adapter(base, str(tmp_path_factory.mktemp("cluster-lora") / "sql"), 5, 8, 16,
                           ["q_proj", "v_proj", "down_proj"], False)
    cfg = EngineConfig(model=base, kv_cache_memory=4 << 20, max_num_seqs=8, lora_modules=(("sql", adapter),))
    c = ClusterEngine(cfg, num_instances=2, policy="llumnix", threads_per_instance=1, cpus_per_instance=1)
    c.auto_rebalance = False
    c.start()
    yield c
    c.shutdown()
    ray.shutdown()


async def consume(c, prompt, rid, lora, on_output=None) -> list[int]:
    tokens = []
    async for out in c.generate(prompt, GREEDY, rid, lora=lora):
        if on_output is not None:
            await on_output(out)
        if out.finished:
            tokens = out.token_ids
    return tokens


def test_an_adapter_request_migrates_with_its_adapter(cluster):
    prompt = random_prompts(1, [21], seed=23)[0]
    alone = asyncio.run(consume(cluster, prompt, "alone", "sql"))
    base = asyncio.run(consume(cluster, prompt, "base", None))
    assert len(alone) == 120 and alone != base       # the adapter is applied, on whichever instance
    moves = []

    async def on_output(out):
        if not out.finished and len(out.token_ids) >= 5 and not moves:
            src = cluster.where("moved")
            moves.append((src, await cluster.migrate("moved"), cluster.where("moved")))

    moved = asyncio.run(consume(cluster, prompt, "moved", "sql", on_output))
    assert moves and moves[0][1] and moves[0][0] != moves[0][2], moves
    assert moved == alone


def test_an_adapter_request_survives_its_instance_dying(cluster):
    prompt = random_prompts(1, [20], seed=33)[0]
    ref = asyncio.run(consume(cluster, prompt, "kill-ref", "sql"))
    killed = []

    async def on_output(out):
        if not killed and len(out.token_ids) >= 20:
            killed.append(cluster.where("kill"))
            ray.kill(cluster.actors[killed[0]], no_restart=False)

    before = cluster.stats.resumed_after_fault
    assert asyncio.run(consume(cluster, prompt, "kill", "sql", on_output)) == ref
    assert cluster.stats.resumed_after_fault > before
    deadline = time.time() + 120
    while cluster.states[killed[0]] != "serving":
        assert time.time() < deadline, "the restarted instance never rejoined"
        time.sleep(0.2)
    # The restarted instance loaded the adapters of the config again: whichever instance takes it, the same.
    assert [asyncio.run(consume(cluster, prompt, f"after-{k}", "sql")) for k in range(2)] == [ref, ref]


def test_openai_server_over_the_cluster_serves_the_adapters_given_at_start(cluster):
    """Runs last: the app's lifespan shuts the cluster down on exit."""
    from fastapi.testclient import TestClient

    from kvloom.engine.engine import Engine
    from kvloom.server.app import ServerSettings, build_app
    from kvloom.server.metrics import ServerMetrics

    cluster.engine = Engine(cluster.config)          # the front's view: tokenizer, limits, the adapters' names
    app = build_app(cluster, ServerSettings("tiny"), ServerMetrics())
    body = {"model": "tiny", "prompt": random_prompts(1, [12], seed=25)[0], "max_tokens": 6, "temperature": 0}
    with TestClient(app) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["sql"]["parent"] == "tiny"
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        tuned = client.post("/v1/completions", json={**body, "model": "sql"}).json()["choices"][0]["text"]
        assert tuned != plain
        refused = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"})
        assert refused.status_code == 400 and "--lora-modules" in refused.json()["error"]["message"]
