"""kvloom on a multi-node Ray cluster, on one machine: Ray's own test cluster (ray.cluster_utils.Cluster
starts a raylet per "node"). The instances land on different nodes (STRICT_SPREAD placement), and a
request migrates between them mid-decode with the same tokens as never moved."""
from __future__ import annotations

import asyncio

import pytest

from conftest import random_prompts
from kvloom import SamplingParams

import ray  # noqa: E402  (a dependency: a missing Ray must fail, not skip)


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir):
    from ray.cluster_utils import Cluster

    from kvloom.cluster.front import ClusterEngine
    from kvloom.config import EngineConfig

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    cfg = EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20, max_num_seqs=8)
    c = ClusterEngine(cfg, num_instances=2, threads_per_instance=1, cpus_per_instance=1, placement="STRICT_SPREAD")
    c.auto_rebalance = False
    c.start()
    yield c
    c.shutdown()
    ray.shutdown()
    nodes.shutdown()


async def consume(c, prompt, params, rid, on_output=None):
    tokens, deltas = None, []
    async for out in c.generate(prompt, params, rid):
        deltas += out.delta_token_ids
        if on_output is not None:
            await on_output(out)
        if out.finished:
            tokens = out.token_ids
    return tokens, deltas


@pytest.mark.parametrize("seed", [None, 11], ids=["greedy", "seeded"])
def test_migration_across_nodes(two_nodes, seed):
    c = two_nodes
    info = c.instances()
    assert info[0]["node_id"] != info[1]["node_id"] and all(i["state"] == "serving" for i in info)
    params = SamplingParams(temperature=0.0 if seed is None else 0.8, seed=seed, max_tokens=160, ignore_eos=True)
    prompt = random_prompts(1, [40], seed=41)[0]
    alone, _ = asyncio.run(consume(c, prompt, params, f"nodes-alone-{seed}"))
    moves = []

    async def on_output(out):
        if not moves and len(out.token_ids) >= 5:
            src = c.where(f"nodes-moved-{seed}")
            moves.append((src, await c.migrate(f"nodes-moved-{seed}", precopy_rounds=2), c.where(f"nodes-moved-{seed}")))

    moved, deltas = asyncio.run(consume(c, prompt, params, f"nodes-moved-{seed}", on_output))
    (src, ok, dst), = moves
    assert ok and src != dst and info[src]["node_id"] != info[dst]["node_id"]
    assert moved == alone and deltas == moved
    assert c.stats.kv_bytes > 0
