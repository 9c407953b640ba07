"""`kvloom bench migration`: how long a live-migrated request stalls, against context length, for the
three ways a request can move between two instances on local Ray:

    kv         stop-and-copy: the request's KV blocks go through Ray's object store with it
    precopy    multi-stage pre-copy: full blocks go while it decodes, the stop ships the rest
    recompute  no KV: the destination recomputes the prompt and the tokens so far (what a system without
               KV migration does, and what resuming after a fault costs)

Per move it records the front's downtime (the request stopped: final export to imported) and the stall
the client sees: the largest gap between consecutive tokens from the move on, next to the request's
median token gap before it. Llumnix's claim to check: the stall stays near flat with context for the KV
modes, while recompute grows with it.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time

from kvloom.config import EngineConfig
from kvloom.sampling_params import SamplingParams
from kvloom.system_info import stack_description

MODES = ("kv", "precopy", "recompute")


async def _one_move(cluster, prompt: list[int], mode: str, rid: str, decode_before: int, after: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=decode_before + after, ignore_eos=True)
    arrivals: list[tuple[float, int]] = []           # (when, tokens so far) per output
    reached = asyncio.Event()

    async def consume():
        async for out in cluster.generate(prompt, params, rid):
            arrivals.append((time.perf_counter(), len(out.token_ids)))
            if len(out.token_ids) >= decode_before:
                reached.set()

    task = asyncio.ensure_future(consume())
    await reached.wait()
    started = time.perf_counter()
    ok = await cluster.migrate(rid, with_kv=mode != "recompute", precopy_rounds=2 if mode == "precopy" else 0)
    await task
    before = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:]) if b[0] <= started]
    later = [t for t, _ in arrivals if t > started]
    last_before = max((t for t, _ in arrivals if t <= started), default=started)
    stall = max([later[0] - last_before] + [b - a for a, b in zip(later, later[1:4])]) if later else None
    return {"ok": ok, "downtime_ms": 1e3 * cluster.last_migration.get("downtime_s", float("nan")),
            "export_ms": 1e3 * cluster.last_migration.get("export_s", float("nan")),
            "stall_ms": None if stall is None else 1e3 * stall,
            "tpot_before_ms": 1e3 * statistics.median(before[1:] or before) if before else None,
            "precopied_blocks": cluster.last_migration.get("precopied_blocks", 0)}


def run_migration_bench(config: EngineConfig, contexts=(128, 256, 512, 1024, 2048), repeats: int = 3,
                        decode_before: int = 8, after: int = 24) -> dict:
    import ray

    from kvloom.cluster.front import ClusterEngine
    from kvloom.kernels import kernels_status

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster = ClusterEngine(config, num_instances=2, threads_per_instance=1, cpus_per_instance=1)
    cluster.auto_rebalance = False
    cluster.start()
    rows = []
    try:
        vocab = _vocab_size(config)
        for ctx in contexts:
            for r in range(repeats):
                for mode in MODES:        # interleaved, so drift hits every mode alike
                    rng = random.Random(f"{ctx}-{r}-{mode}")   # a fresh prompt: no prefix cache help anywhere
                    prompt = [rng.randrange(100, vocab) for _ in range(ctx)]
                    row = asyncio.run(_one_move(cluster, prompt, mode, f"mig-{ctx}-{r}-{mode}", decode_before, after))
                    rows.append({"context": ctx, "mode": mode, "repeat": r, **row})
                    print(rows[-1], flush=True)
    finally:
        cluster.shutdown()
        ray.shutdown()
    table = []
    for ctx in contexts:
        for mode in MODES:
            got = [x for x in rows if x["context"] == ctx and x["mode"] == mode and x["ok"]]
            if got:
                table.append({"context": ctx, "mode": mode, "moves": len(got),
                              "downtime_ms_median": statistics.median(x["downtime_ms"] for x in got),
                              "stall_ms_median": statistics.median(x["stall_ms"] for x in got),
                              "tpot_before_ms_median": statistics.median(x["tpot_before_ms"] for x in got)})
    return {"stack": stack_description(), "kernels": kernels_status(), "model": config.model,
            "instances": "2 x 1 thread, local Ray", "decode_before_move": decode_before, "table": table, "rows": rows}


def _vocab_size(config: EngineConfig) -> int:
    from kvloom.models.model_source import resolve_model
    from kvloom.tokenizer import Tokenizer
    return Tokenizer.load(resolve_model(config.model)).hf.vocab_size


def format_table(result: dict) -> str:
    lines = ["| context | mode | downtime ms | client stall ms | token gap before ms |", "|---|---|---|---|---|"]
    for t in result["table"]:
        lines.append(f"| {t['context']} | {t['mode']} | {t['downtime_ms_median']:.1f} | {t['stall_ms_median']:.1f} | "
                     f"{t['tpot_before_ms_median']:.1f} |")
    return "\n".join(lines)
