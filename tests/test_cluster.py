"""kvloom on Ray: dispatch policies (pure, no Ray), and a local two-instance cluster: load spreading,
prefix affinity, and live migration of a running request (same tokens as without, a stream with no gap or
repeat, no KV block leaked on either instance)."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from conftest import random_prompts
from kvloom import SamplingParams
from kvloom.cluster import dispatch
from kvloom.cluster.engine_actor import LoadReport


def load(i, running=0, waiting=0, free=100, demand=0, alive=True):
    after = free - demand
    return LoadReport(i, running, waiting, free, 100, demand, after, after / max(1, running), 16, alive)


# ---- dispatch policies -------------------------------------------------------------------------

def test_round_robin_takes_turns_and_skips_dead_instances():
    rr = dispatch.make_policy("round-robin")
    loads = [load(0), load(1), load(2)]
    assert [rr(loads) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    loads[1] = load(1, alive=False)
    assert {rr(loads) for _ in range(4)} == {0, 2}
    with pytest.raises(dispatch.NoInstanceError):
        rr([load(0, alive=False)])


def test_least_loaded_and_power_of_two():
    loads = [load(0, running=3), load(1, running=1, waiting=1), load(2, running=1)]
    assert dispatch.least_loaded(loads) == 2
    rng = random.Random(0)
    picks = [dispatch.power_of_two(loads, rng=rng) for _ in range(200)]
    assert 0 not in picks                              # instance 0 loses every pair it is in
    assert set(picks) == {1, 2}
    assert dispatch.power_of_two([load(5)]) == 5


def test_llumnix_picks_the_freest_instance():
    loads = [load(0, running=2, free=40), load(1, running=1, free=30), load(2, running=4, free=90, demand=10)]
    # freeness: 20, 30, 20 blocks per running request
    assert dispatch.llumnix(loads) == 1
    assert dispatch.llumnix(loads, prefix_blocks={0: 0, 1: 0, 2: 0}, prompt_len=10) == 1


def test_llumnix_prefix_affinity_unless_overloaded():
    loads = [load(0, running=1, free=90), load(1, running=3, free=30)]
    assert dispatch.llumnix(loads, prefix_blocks={0: 0, 1: 3}, prompt_len=60) == 1     # the longest prefix wins
    assert dispatch.llumnix(loads, prefix_blocks={0: 1, 1: 3}, prompt_len=60) == 1
    # The holder's queue already overflows its free blocks: the freest instance instead.
    loads[1] = load(1, running=3, waiting=5, free=30, demand=40)
    assert dispatch.llumnix(loads, prefix_blocks={0: 0, 1: 3}, prompt_len=60) == 0


def test_unknown_policy():
    with pytest.raises(ValueError, match="llumnix"):
        dispatch.make_policy("random-walk")


# ---- a local Ray cluster of two instances ----------------------------------------------------------

import ray  # noqa: E402  (after the tests that need no Ray)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    from kvloom.cluster.front import ClusterEngine
    from kvloom.config import EngineConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20, max_num_seqs=8)
    c = ClusterEngine(cfg, num_instances=2, policy="llumnix", threads_per_instance=1, cpus_per_instance=1)
    c.start()
    yield c
    c.shutdown()
    ray.shutdown()


async def consume(c, prompt, params, rid, on_output=None) -> dict:
    r = {"streamed": "", "deltas": [], "text": None, "tokens": None}
    async for out in c.generate(prompt, params, rid):
        r["streamed"] += out.delta_text
        r["deltas"] += out.delta_token_ids
        if on_output is not None:
            await on_output(out)
        if out.finished:
            r["text"], r["tokens"] = out.text, out.token_ids
    return r


def placed(c, rid) -> int:
    return next(i for r, i in reversed(c.placements) if r == rid)


def wait_idle(c, timeout=30.0):
    """Until both instances report nothing running and every block free (cached blocks count as free)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        loads = ray.get([a.load.remote() for a in c.actors])
        if all(l.running == 0 and l.waiting == 0 and l.free_blocks == l.total_blocks for l in loads):
            return loads
        time.sleep(0.05)
    raise AssertionError(f"instances still busy or holding blocks: {loads}")


def test_instances_are_separate_processes(cluster):
    info = cluster.info()
    assert [i["instance_id"] for i in info] == [0, 1]
    assert info[0]["pid"] != info[1]["pid"]
    assert all(i["node_id"] and i["torch_threads"] == 1 and i["alive"] for i in info)


def test_dispatch_spreads_load(cluster):
    prompts = random_prompts(4, [20, 24, 28, 32], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run():
        return await asyncio.gather(*[consume(cluster, p, params, f"spread-{k}") for k, p in enumerate(prompts)])

    results = asyncio.run(run())
    assert all(len(r["tokens"]) == 8 and r["streamed"] == r["text"] for r in results)
    assert sorted(placed(cluster, f"spread-{k}") for k in range(4)) == [0, 0, 1, 1]
    wait_idle(cluster)


def test_prefix_affinity(cluster):
    """Two warm-up requests land on different instances; a later prompt sharing one's 48-token prefix goes
    to the instance that holds it, whichever that is."""
    shared = random_prompts(2, [48, 48], seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def warm():
        await asyncio.gather(*[consume(cluster, s + [7, 8], params, f"warm-{k}") for k, s in enumerate(shared)])

    asyncio.run(warm())
    holders = [placed(cluster, f"warm-{k}") for k in range(2)]
    assert sorted(holders) == [0, 1]
    for k, s in enumerate(shared):
        cached = ray.get([a.cached_prefix_blocks.remote(s + [9]) for a in cluster.actors])
        assert cached[holders[k]] == 3 and cached[1 - holders[k]] == 0
    for k in (1, 0, 1):
        rid = f"again-{k}-{time.monotonic_ns()}"
        r = asyncio.run(consume(cluster, shared[k] + [30 + k, 31], params, rid))
        assert len(r["tokens"]) == 4
        assert placed(cluster, rid) == holders[k]
    wait_idle(cluster)


GREEDY = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=200, ignore_eos=True)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_migration_mid_decode_gives_the_same_tokens(cluster, params):
    prompt = random_prompts(1, [21], seed=23)[0]
    alone = asyncio.run(consume(cluster, prompt, params, f"alone-{params.seed}"))
    assert len(alone["tokens"]) == 200
    wait_idle(cluster)

    rid = f"moved-{params.seed}"
    moves = []

    async def on_output(out):
        n = len(out.token_ids)
        if not out.finished and ((n >= 5 and not moves) or (n >= 40 and len(moves) == 1)):
            src = cluster.where(rid)
            ok = await cluster.migrate(rid)          # to the other instance, then back
            moves.append((src, cluster.where(rid), ok, n))

    moved = asyncio.run(consume(cluster, prompt, params, rid, on_output))
    assert [ok for *_, ok, _ in moves] == [True, True], moves
    assert moves[0][0] != moves[0][1] and moves[1][0] == moves[0][1] and moves[1][1] == moves[0][0]
    assert moved["tokens"] == alone["tokens"]
    assert moved["deltas"] == moved["tokens"]                       # token stream: no gap, no repeat
    assert moved["text"] == alone["text"] and moved["streamed"] == moved["text"]
    wait_idle(cluster)                                              # no block leaked on either instance


@pytest.mark.parametrize("seed", [None, 99], ids=["greedy", "seeded"])
def test_precopy_migration_gives_the_same_tokens(cluster, seed):
    """Multi-stage pre-copy: the prompt's full blocks go while the request decodes; the stop ships the rest."""
    params = SamplingParams(temperature=0.0 if seed is None else 0.9, seed=seed, max_tokens=150, ignore_eos=True)
    prompt = random_prompts(1, [80], seed=27)[0]
    alone = asyncio.run(consume(cluster, prompt, params, f"pre-alone-{seed}"))
    wait_idle(cluster)
    rid, moves = f"pre-moved-{seed}", []

    async def on_output(out):
        if not out.finished and len(out.token_ids) >= 4 and not moves:
            moves.append(await cluster.migrate(rid, precopy_rounds=3))
            moves.append(dict(cluster.last_migration))

    moved = asyncio.run(consume(cluster, prompt, params, rid, on_output))
    assert moves[0] is True
    assert moves[1]["precopied_blocks"] >= 5 and moves[1]["reused_blocks"] == moves[1]["precopied_blocks"]
    assert moved["tokens"] == alone["tokens"] and moved["deltas"] == moved["tokens"]
    assert moved["text"] == alone["text"] == moved["streamed"]
    wait_idle(cluster)


def test_migrating_a_finished_request_is_refused(cluster):
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    r = asyncio.run(consume(cluster, random_prompts(1, [10], seed=24)[0], params, "done"))
    assert len(r["tokens"]) == 3
    assert cluster.migrate_sync("done") is False
    wait_idle(cluster)


def test_a_consumer_that_leaves_aborts_its_request(cluster):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def run():
        gen = cluster.generate(random_prompts(1, [15], seed=26)[0], params, "leaver")
        async for out in gen:
            if len(out.token_ids) >= 3:
                break
        await gen.aclose()

    asyncio.run(run())
    assert cluster.where("leaver") is None
    loads = wait_idle(cluster)                       # aborted on its instance, its blocks freed
    assert all("leaver" not in i["running"] for i in cluster.info())
    assert len(loads) == 2


def test_a_refused_request_raises_the_engine_error(cluster):
    from kvloom.errors import PromptTooLongError

    async def run():
        async for _ in cluster.generate(list(range(5, 300)), SamplingParams(max_tokens=4), "too-long"):
            pass

    with pytest.raises(PromptTooLongError):
        asyncio.run(run())
    assert cluster.where("too-long") is None and cluster.is_alive


def test_openai_server_over_the_cluster(cluster, tiny_model_dir):
    """The HTTP app runs unchanged over the cluster (what `kvloom serve --instances N` builds). Runs last:
    the app's lifespan shuts the cluster down on exit."""
    from fastapi.testclient import TestClient

    from kvloom.engine.engine import Engine
    from kvloom.server.app import ServerSettings, build_app
    from kvloom.server.metrics import ServerMetrics

    cluster.engine = Engine(cluster.config)          # the front's view: tokenizer and limits only
    app = build_app(cluster, ServerSettings("tiny"), ServerMetrics())
    prompt = random_prompts(1, [12], seed=25)[0]
    with TestClient(app) as client:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}
        plain = client.post("/v1/completions", json=body).json()
        assert plain["usage"]["completion_tokens"] == 6
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ") and "[DONE]" not in line]
        import json
        text = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks if json.loads(c[6:])["choices"])
        assert text == plain["choices"][0]["text"]
        assert client.get("/health").status_code == 200
        wait_idle(cluster)
