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
from kvloom.cluster.load import LoadReport


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
    c.auto_rebalance = False          # tests place and move requests themselves; rebalance_once() on demand
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
    assert all(i["frozen_objects"] > 10_000 for i in info)   # the start-up heap is out of full collections


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

    # Paced steps: the request must still be decoding through three pre-copy rounds on a busy machine.
    ray.get([a.set_pace.remote(0.01) for a in cluster.actors])
    try:
        moved = asyncio.run(consume(cluster, prompt, params, rid, on_output))
    finally:
        ray.get([a.set_pace.remote(0.0) for a in cluster.actors])
    assert moves[0] is True
    assert moves[1]["precopied_blocks"] >= 5 and moves[1]["reused_blocks"] == moves[1]["precopied_blocks"]
    assert moved["tokens"] == alone["tokens"] and moved["deltas"] == moved["tokens"]
    assert moved["text"] == alone["text"] == moved["streamed"]
    wait_idle(cluster)


def test_a_family_of_two_migrates_together(cluster):
    """n=2 seeded: both samples move in one snapshot and each gives the tokens it gives unmoved."""
    params = SamplingParams(n=2, temperature=0.9, seed=77, max_tokens=150, ignore_eos=True)
    prompt = random_prompts(1, [30], seed=35)[0]

    async def run(rid, move):
        outs, moved = {}, []
        async for out in cluster.generate(prompt, params, rid):
            outs.setdefault(out.index, []).extend(out.delta_token_ids)
            if move and not moved and len(out.token_ids) >= 6:
                moved.append(await cluster.migrate(rid))
        return outs, moved

    alone, _ = asyncio.run(run("fam-alone", False))
    moved, ok = asyncio.run(run("fam-moved", True))
    assert ok == [True]
    assert moved == alone and alone[0] != alone[1]
    wait_idle(cluster)


@pytest.mark.parametrize("ending", ["aborted", "finished"])
def test_a_request_that_ends_during_precopy_frees_the_staged_blocks(cluster, ending):
    """The client leaves (or the request finishes) while its blocks are being pre-copied: the move is
    refused and no block stays reserved on the destination."""
    params = SamplingParams(temperature=0.0, max_tokens=200 if ending == "aborted" else 60, ignore_eos=True)
    prompt = random_prompts(1, [80], seed=36)[0]
    rid, result = f"pre-{ending}", {}
    real_precopy = cluster._precopy

    def precopy_then_end(request_id, src, to, rounds):
        copied = real_precopy(request_id, src, to, rounds)      # (source block ids, bytes staged)
        result["staged"] = len(copied[0])
        if ending == "aborted":
            cluster.abort(request_id)
        deadline = time.time() + 10
        while ray.get(cluster.actors[src].has.remote(request_id)) and time.time() < deadline:
            time.sleep(0.02)
        return copied

    async def run():
        gen = cluster.generate(prompt, params, rid)
        async for out in gen:
            if len(out.token_ids) >= 4 and "moved" not in result:
                result["moved"] = await cluster.migrate(rid, precopy_rounds=3)
                if ending == "aborted":
                    break
        await gen.aclose()

    cluster._precopy = precopy_then_end
    try:
        asyncio.run(run())
    finally:
        cluster._precopy = real_precopy
    assert result["staged"] >= 5 and result["moved"] is False
    wait_idle(cluster)               # every block free on both instances: nothing left staged


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


async def reference(c, prompts, params, tag) -> list[list[int]]:
    """Each prompt's tokens with no migration (the batch is invariant: alone or together, the same)."""
    rs = await asyncio.gather(*[consume(c, p, params, f"{tag}-ref-{k}") for k, p in enumerate(prompts)])
    return [r["tokens"] for r in rs]


def in_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_rebalancer_moves_requests_off_the_busier_instance(cluster):
    """Pile every request on one instance: a rebalancing round moves some back (reason "imbalance"), and
    every request still gives the tokens it gives unmoved."""
    from kvloom.cluster.rebalance import RebalanceSettings

    prompts = random_prompts(4, [12, 14, 16, 18], seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    plan = []

    async def run():
        ref = await reference(cluster, prompts, params, "imb")
        wait_idle(cluster)

        async def on_output(out):
            if not plan and len(out.token_ids) >= 3:
                plan.append("piled")
                for k in range(4):
                    if cluster.where(f"imb-{k}") == 1:
                        assert await cluster.migrate(f"imb-{k}", to=0)
                plan.append(sorted(cluster.where(f"imb-{k}") for k in range(4)))
                cluster._recently_moved.clear()
                plan.append(await in_thread(cluster.rebalance_once))

        rs = await asyncio.gather(*[consume(cluster, p, params, f"imb-{k}", on_output if k == 0 else None)
                                    for k, p in enumerate(prompts)])
        return ref, rs

    saved = cluster.rebalance_settings
    cluster.rebalance_settings = RebalanceSettings(imbalance_gap=0.5)
    try:
        ref, rs = asyncio.run(run())
    finally:
        cluster.rebalance_settings = saved
    assert plan[1] == [0, 0, 0, 0]
    moves = plan[2]
    assert moves and all(m.src == 0 and m.dst == 1 and m.reason == "imbalance" for m in moves), moves
    assert [r["tokens"] for r in rs] == ref
    assert all(r["deltas"] == r["tokens"] for r in rs)
    assert cluster.stats.count.get("imbalance", 0) >= 1 and cluster.stats.downtime_seconds
    wait_idle(cluster)


def test_drain_moves_every_request_out_and_takes_none_in(cluster):
    prompts = random_prompts(6, [10, 12, 14, 16, 18, 20], seed=32)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=250, ignore_eos=True)
    seen = {}

    async def run():
        ref = await reference(cluster, prompts, params, "drain")
        wait_idle(cluster)

        async def on_output(out):
            if not seen and len(out.token_ids) >= 3:
                seen["instance"] = i = cluster.where("drain-0")
                cluster.drain(i)
                while cluster.states[i] != "drained":
                    await in_thread(cluster.rebalance_once)
                    await asyncio.sleep(0.01)
                seen["where"] = [cluster.where(f"drain-{k}") for k in range(6)]
                seen["new"] = cluster.placements[-1]
                late = await consume(cluster, prompts[0], params, "drain-late")
                seen["late"] = (late["tokens"], placed(cluster, "drain-late"))

        rs = await asyncio.gather(*[consume(cluster, p, params, f"drain-{k}", on_output if k == 0 else None)
                                    for k, p in enumerate(prompts)])
        return ref, rs

    ref, rs = asyncio.run(run())
    i = seen["instance"]
    try:
        assert all(w in (None, 1 - i) for w in seen["where"]), seen
        assert seen["late"] == (ref[0], 1 - i)                 # new work goes to the serving instance
        assert [r["tokens"] for r in rs] == ref                 # none dropped, none changed
        assert cluster.instances()[i]["state"] == "drained"
        assert ray.get(cluster.actors[i].load.remote()).running == 0
    finally:
        cluster.undrain(i)
    assert cluster.states[i] == "serving"
    wait_idle(cluster)


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_a_request_survives_its_instance_dying(cluster, seed):
    """Kill the actor running a request mid-stream: the front resumes it on the other instance from the
    tokens it streamed (the same tokens as never interrupted; no gap, no repeat), Ray restarts the actor,
    and it rejoins empty."""
    params = SamplingParams(temperature=0.0 if seed is None else 0.9, seed=seed, max_tokens=200, ignore_eos=True)
    prompts = random_prompts(2, [20, 22], seed=33)
    killed = []

    async def run():
        ref = await reference(cluster, prompts, params, f"kill-{seed}")
        wait_idle(cluster)

        async def on_output(out):
            if not killed and len(out.token_ids) >= 20:
                killed.append(cluster.where(f"kill-{seed}-0"))
                ray.kill(cluster.actors[killed[0]], no_restart=False)

        rs = await asyncio.gather(*[consume(cluster, p, params, f"kill-{seed}-{k}", on_output if k == 0 else None)
                                    for k, p in enumerate(prompts)])
        return ref, rs

    before = cluster.stats.resumed_after_fault
    ref, rs = asyncio.run(run())
    assert [r["tokens"] for r in rs] == ref
    assert all(r["deltas"] == r["tokens"] and r["streamed"] == r["text"] for r in rs)
    assert cluster.stats.resumed_after_fault > before and cluster.stats.lost_after_fault == 0
    deadline = time.time() + 120
    while cluster.states[killed[0]] != "serving":
        assert time.time() < deadline, "the restarted instance never rejoined"
        time.sleep(0.2)
    r = asyncio.run(consume(cluster, prompts[0], params, f"kill-{seed}-after"))
    assert r["tokens"] == ref[0]
    wait_idle(cluster)


def test_an_urgent_request_jumps_a_full_clusters_queue(cluster):
    """Every seat of both instances taken by low-priority requests, more queued: an urgent request
    (priority -1) starts before any of the queued ones, preempting a running low-priority one."""
    prompts = random_prompts(20, [10] * 20, seed=34)
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    first_token: dict[str, float] = {}

    async def consume_timed(rid, prompt, priority):
        async for out in cluster.generate(prompt, params, rid, priority=priority):
            first_token.setdefault(rid, time.perf_counter())

    async def run():
        low = [asyncio.ensure_future(consume_timed(f"low-{k}", p, 1)) for k, p in enumerate(prompts)]
        while sum(l.running for l in cluster.loads()) < 16:
            await asyncio.sleep(0.005)
        urgent = asyncio.ensure_future(consume_timed("urgent", prompts[0], -1))
        await asyncio.gather(urgent, *low)

    asyncio.run(run())
    queued = sorted(first_token[f"low-{k}"] for k in range(20))[16:]     # the four that had to wait
    assert first_token["urgent"] < queued[0]
    wait_idle(cluster)


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
        operator_routes(client, body)


def operator_routes(client, body):
    """/server_info lists the instances and the requests they run, by the ids responses carry; an operator
    migrates a streaming request by that id and drains an instance; /metrics and /health show it."""
    import json
    import threading

    long = {**body, "max_tokens": 300, "ignore_eos": True}
    want = client.post("/v1/completions", json=long).json()["choices"][0]["text"]
    got = {"chunks": []}

    def stream():
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            got["chunks"] = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: ") and "[DONE]" not in l]

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while True:
        info = client.get("/server_info").json()
        running = [(i["id"], r) for i in info["instances"] for r in i["running"]]
        if running or time.time() > deadline:
            break
        time.sleep(0.01)
    assert [i["state"] for i in info["instances"]] == ["serving", "serving"]
    assert all(i["pid"] and i["node_id"] and i["threads"] == 1 for i in info["instances"])
    (src, rid), = running
    moved = client.post("/admin/migrate", json={"request_id": rid}).json()
    assert moved["moved"] == [{"request_id": rid, "ok": True, "instance": 1 - src}]
    assert client.post("/admin/migrate", json={"request_id": "nope"}).status_code == 404
    assert client.post("/admin/migrate", json={"request_id": rid, "to": 7}).status_code == 400
    t.join(60)
    assert {c["id"] for c in got["chunks"]} == {rid}
    assert "".join(c["choices"][0]["text"] for c in got["chunks"] if c["choices"]) == want

    stats = client.get("/dashboard/stats").json()["instances"]     # the dashboard draws one panel each
    assert [(s["id"], s["state"]) for s in stats] == [("0", "serving"), ("1", "serving")]
    assert sum(s["generation_tokens_total"] for s in stats) >= 600 and all(s["generation_tokens_total"] for s in stats)

    metrics = client.get("/metrics").text
    assert 'kvloom_instance_num_requests_running{instance="1"}' in metrics
    assert 'kvloom_migrations_total{reason="manual"}' in metrics
    assert "kvloom_migration_downtime_seconds_count" in metrics
    generated = [l for l in metrics.splitlines() if l.startswith("vllm:generation_tokens_total")]
    assert generated and float(generated[0].split()[-1]) >= 600     # the instances' sums, under vLLM's names

    assert client.post("/admin/instances/0/drain").json() == {"id": 0, "state": "draining"}
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert client.post("/admin/instances/0/undrain").json()["state"] == "serving"
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/admin/instances/5/drain").status_code == 400
    wait_idle(cluster_of(client))


def cluster_of(client):
    return client.app.state.async_engine
