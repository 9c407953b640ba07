"""Where lookahead's time goes at a concurrency, by kind of step: `python benchmarks/spec_step_kinds.py
CONCURRENCY [QUANTIZATION] [OUT.json]` (default auto: the default mode).

Runs `kvloom bench spec`'s workload (a closed loop of new poisson prompts, 128 in / 96 out, two rounds
alternating the engines after a warm-up) and times every step of both engines: scheduling (where drafts
are made) and the rest. Steps are grouped by what they carried: decodes alone, decodes beside prompt chunks,
prompt chunks alone; "+drafts" where some decode carried draft tokens. Works on any checkout (it reads only
the engine's step and the scheduler's plan).
"""
import collections
import dataclasses
import json
import sys
import time

from kvloom.bench.speculative import _WARM_UP_SEED, _run
from kvloom.bench.workloads import synthetic_workload
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.kernels import kernels


def _kind(plan) -> str:
    drafted = [c for c in plan.chunks if c.num_draft_tokens]
    prompts = [c for c in plan.spans if not c.num_draft_tokens]
    kind = "decodes" if not prompts else "decodes + prompts" if plan.decodes or drafted else "prompts"
    return kind + (" + drafts" if drafted else "")


def _instrument(engine: Engine, steps: list[dict]) -> None:
    schedule, execute = engine.scheduler.schedule, engine._execute
    timing: dict = {}

    def timed_schedule():
        t = time.perf_counter()
        plan = schedule()
        timing["schedule"] = time.perf_counter() - t
        return plan

    def timed_execute(plan, started):
        t = time.perf_counter()
        out = execute(plan, started)
        done = time.perf_counter()
        steps.append({"kind": _kind(plan), "schedule_s": timing["schedule"], "execute_s": done - t,
                      "step_s": done - started, "decode_rows": len(plan.decodes) + sum(
                          1 for c in plan.spans if c.num_draft_tokens),
                      "draft_tokens": sum(c.num_draft_tokens for c in plan.chunks),
                      "prompt_tokens": sum(len(c.token_ids) for c in plan.spans if not c.num_draft_tokens)})
        return out

    engine.scheduler.schedule = timed_schedule
    engine._execute = timed_execute


def main(concurrency: int, quantization: str = "auto", out: str | None = None) -> None:
    config = EngineConfig(quantization=quantization)
    engines = {name: Engine(dataclasses.replace(config, speculative=name)) for name in ("none", "lookahead")}
    tokenizer, max_len = engines["none"].tokenizer, engines["none"].max_model_len

    def prompts(seed: int, n: int) -> list[list[int]]:
        wl = synthetic_workload(tokenizer, "poisson", n, float("inf"), 1.0, 128, 96, 0.0, max_len, seed=seed)
        return [r.prompt for r in wl.requests]

    for engine in engines.values():
        _run(engine, prompts(_WARM_UP_SEED, concurrency), 16, concurrency)
    steps: dict[str, list[dict]] = {name: [] for name in engines}
    for name, engine in engines.items():
        _instrument(engine, steps[name])
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(2):
        order = list(engines.items())
        for name, engine in order if r % 2 == 0 else order[::-1]:
            runs[name].append(_run(engine, prompts(r, 2 * concurrency), 96, concurrency))
    result = {"concurrency": concurrency, "quantization": quantization,
              "isa": None if kernels() is None else kernels().isa(), "engines": {}}
    for name in engines:
        wall = sum(r["wall_s"] for r in runs[name])
        tokens = sum(r["output_tokens"] for r in runs[name])
        kinds = collections.defaultdict(list)
        for s in steps[name]:
            kinds[s["kind"]].append(s)
        table = {}
        for kind, group in sorted(kinds.items()):
            n = len(group)
            mean = lambda key, scale=1.0: round(sum(s[key] for s in group) / n * scale, 2)  # noqa: E731
            table[kind] = {"steps": n, "total_s": round(sum(s["step_s"] for s in group), 3),
                           "step_ms": mean("step_s", 1e3), "scheduling_ms": mean("schedule_s", 1e3),
                           "executing_ms": mean("execute_s", 1e3), "decode_rows": mean("decode_rows"),
                           "draft_tokens": mean("draft_tokens"), "prompt_tokens": mean("prompt_tokens")}
        result["engines"][name] = {"output_tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
                                   "steps_by_kind": table}
        print(f"{name}: {tokens / wall:.1f} output tok/s, {wall:.1f} s")
        for kind, row in table.items():
            print(f"  {kind:26s} {row['steps']:4d} steps, {row['total_s']:6.2f} s; a step: "
                  f"{row['step_ms']:6.1f} ms ({row['scheduling_ms']:5.2f} scheduling), "
                  f"{row['decode_rows']:4.1f} decode rows, {row['draft_tokens']:4.1f} draft tokens, "
                  f"{row['prompt_tokens']:5.1f} prompt tokens")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32, sys.argv[2] if len(sys.argv) > 2 else "auto",
         sys.argv[3] if len(sys.argv) > 3 else None)
