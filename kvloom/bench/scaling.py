"""`kvloom bench scaling`: inference-time scaling on a checkable task set (kvloom/eval/tasks.py).

  accuracy   greedy and single-sample accuracy; coverage (any of N right: Large Language Monkeys' curve) and
             majority-vote accuracy at N = 1, 4, 16, 64, each N a timed run of n=N samples sharing the prompt
  adaptive   adaptive sampling (rounds of 4 until the leader's posterior reaches p): accuracy, mean samples,
             tokens and seconds, beside fixed-N voting
  sharing    N samples of one 500-token prompt as one request (forks share its KV) against N separate
             requests (no prefix sharing: each its own cache salt), alternated, median of the repeats
"""
from __future__ import annotations

import logging
import re
import statistics
import time
import uuid

from kvloom.config import EngineConfig
from kvloom.corpus import prompts_of_length
from kvloom.engine.engine import Engine
from kvloom.eval.tasks import ANSWER_REGEX, chat_messages, make_tasks
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.answers import extract_answer, majority
from kvloom.scaling.offline import generate_scaled
from kvloom.scaling.spec import ScalingSpec
from kvloom.system_info import engine_description

log = logging.getLogger(__name__)


def _run(engine: Engine, prompts: list, params: SamplingParams, salts: list | None = None) -> tuple[dict, float, int]:
    """All prompts at once; (request index -> texts of its samples in index order, seconds, tokens)."""
    start = time.perf_counter()
    ids = [engine.add_request(p, params, cache_salt=None if salts is None else salts[i])
           for i, p in enumerate(prompts)]
    texts: dict[str, dict[int, str]] = {rid: {} for rid in ids}
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                texts[out.parent_id][out.index] = out.text
                tokens += len(out.token_ids)
    seconds = time.perf_counter() - start
    log.info("bench scaling: %d requests of n=%d in %.1f s (%d tokens)", len(prompts), params.n, seconds, tokens)
    return {i: [texts[rid][k] for k in sorted(texts[rid])] for i, rid in enumerate(ids)}, seconds, tokens


def _sample_counts(max_n: int) -> list[int]:
    ns, n = [], 1
    while n <= max_n:
        ns.append(n)
        n *= 4
    return ns if ns[-1] == max_n else ns + [max_n]


def accuracy_curves(engine: Engine, prompts: list, answers: list[str], max_n: int, params: SamplingParams) -> dict:
    pattern = re.compile(ANSWER_REGEX)
    greedy, g_seconds, g_tokens = _run(engine, prompts, SamplingParams(temperature=0, max_tokens=params.max_tokens,
                                                                       stop=params.stop))
    greedy_acc = statistics.mean(extract_answer(greedy[i][0], pattern) == a for i, a in enumerate(answers))
    runs, samples = [], {}
    for n in _sample_counts(max_n):
        texts, seconds, tokens = _run(engine, prompts, SamplingParams(**{**_kw(params), "n": n}))
        samples[n] = {i: [extract_answer(t, pattern) for t in ts] for i, ts in texts.items()}
        runs.append({"n": n, "seconds": round(seconds, 2), "completion_tokens": tokens})
    full = samples[max(samples)]
    # Seeded samples depend only on their seed and tokens: a run of n draws the first n samples of the largest.
    consistent = all(samples[n][i] == full[i][:n] for n in samples for i in full)
    for run in runs:
        n = run["n"]
        run["coverage"] = statistics.mean(a in full[i][:n] for i, a in enumerate(answers))
        run["vote_accuracy"] = statistics.mean(majority(full[i][:n])[0] == a for i, a in enumerate(answers))
    sample_acc = statistics.mean(x == a for i, a in enumerate(answers) for x in full[i])
    return {"greedy_accuracy": greedy_acc, "greedy_seconds": round(g_seconds, 2), "greedy_tokens": g_tokens,
            "single_sample_accuracy": sample_acc, "runs": runs, "runs_draw_the_same_samples": consistent}


def adaptive_runs(engine: Engine, prompts: list, answers: list[str], max_n: int, params: SamplingParams,
                  confidences: list[float]) -> list[dict]:
    rows = []
    for p in confidences:
        spec = ScalingSpec.from_fields(adaptive={"max_n": max_n, "confidence": p, "round": 4,
                                                 "extract": ANSWER_REGEX})
        start = time.perf_counter()
        results = generate_scaled(engine, prompts, [params] * len(prompts), spec, f"adaptive-{uuid.uuid4().hex}")
        seconds = time.perf_counter() - start
        exts = [r.extension for r in results]
        log.info("bench scaling: adaptive (confidence %s) in %.1f s", p, seconds)
        rows.append({"confidence": p, "seconds": round(seconds, 2),
                     "accuracy": statistics.mean(e["vote"]["answer"] == a for e, a in zip(exts, answers)),
                     "mean_samples": statistics.mean(e["samples_used"] for e in exts),
                     "mean_samples_started": statistics.mean(e["samples_used"] + e["samples_aborted"] for e in exts),
                     "completion_tokens": sum(e["completion_tokens"] for e in exts)})
    return rows


def sharing_cost(engine: Engine, prompt_len: int, n: int, output_len: int, repeats: int, seed: int) -> dict:
    """n samples of one prompt as one request against n separate requests, alternated; medians."""
    prompt = prompts_of_length(engine.tokenizer, [prompt_len])[0]
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=output_len, ignore_eos=True)
    shared, separate = [], []
    for _ in range(repeats):
        # fresh cache salts: nothing is found in the prefix cache from an earlier repeat or the other side
        _, s, _ = _run(engine, [prompt], SamplingParams(**{**_kw(params), "n": n}), [uuid.uuid4().hex])
        shared.append(s)
        _, s, _ = _run(engine, [prompt] * n, params, [uuid.uuid4().hex for _ in range(n)])
        separate.append(s)
    a, b = statistics.median(shared), statistics.median(separate)
    return {"prompt_tokens": len(prompt), "n": n, "output_tokens": output_len, "repeats": repeats,
            "shared_seconds": [round(x, 3) for x in shared], "separate_seconds": [round(x, 3) for x in separate],
            "shared_median_s": round(a, 3), "separate_median_s": round(b, 3), "ratio": round(a / b, 3),
            "goal_ratio": 0.6, "goal_met": a / b <= 0.6}


def _kw(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, top_p=p.top_p, seed=p.seed, max_tokens=p.max_tokens, stop=p.stop,
                ignore_eos=p.ignore_eos)


def run_scaling_bench(config: EngineConfig, items: int, max_n: int, temperature: float, max_tokens: int,
                      confidences: list[float], share_prompt_len: int, share_n: int, share_output_len: int,
                      repeats: int, seed: int = 0, parts: tuple[str, ...] = ("accuracy", "adaptive", "sharing")
                      ) -> dict:
    engine = Engine(config)
    tasks = make_tasks(items, seed)
    prompts = [engine.tokenizer.apply_chat_template(chat_messages(t), True) for t in tasks]
    answers = [t.answer for t in tasks]
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, stop=["\n"])
    started = time.perf_counter()
    result = {"system": engine_description(engine),
              "settings": {"items": items, "task_seed": seed, "max_n": max_n, "temperature": temperature,
                           "max_tokens": max_tokens, "stop": ["\n"], "answer_regex": ANSWER_REGEX,
                           "kinds": sorted({t.kind for t in tasks}), "parts": list(parts)}}
    if "accuracy" in parts:
        result["accuracy"] = accuracy_curves(engine, prompts, answers, max_n, params)
    if "adaptive" in parts:
        result["adaptive"] = adaptive_runs(engine, prompts, answers, max_n, params, confidences)
    if "sharing" in parts:
        result["sharing"] = sharing_cost(engine, share_prompt_len, share_n, share_output_len, repeats, seed)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    return result


def format_table(result: dict) -> str:
    lines = []
    acc = result.get("accuracy")
    if acc is not None:
        lines += [f"{result['settings']['items']} items, greedy accuracy {acc['greedy_accuracy']:.3f}, single-sample "
                  f"accuracy {acc['single_sample_accuracy']:.3f} (T={result['settings']['temperature']})",
                  "| N | coverage | vote accuracy | seconds | completion tokens |", "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['coverage']:.3f} | {r['vote_accuracy']:.3f} | {r['seconds']} | "
                  f"{r['completion_tokens']} |" for r in acc["runs"]]
    if "adaptive" in result:
        lines += ["", "| adaptive confidence | accuracy | mean samples (started) | seconds | completion tokens |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['confidence']} | {r['accuracy']:.3f} | {r['mean_samples']:.1f} "
                  f"({r['mean_samples_started']:.1f}) | {r['seconds']} | {r['completion_tokens']} |"
                  for r in result["adaptive"]]
    s = result.get("sharing")
    if s is None:
        return "\n".join(lines)
    lines += ["", f"sharing: {s['n']} samples of a {s['prompt_tokens']}-token prompt, {s['output_tokens']} tokens each: "
              f"one request {s['shared_median_s']} s, {s['n']} separate requests {s['separate_median_s']} s, "
              f"ratio {s['ratio']} (goal <= {s['goal_ratio']}: {'met' if s['goal_met'] else 'not met'})"]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    runs = acc["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "n", "samples per query (N)"), (axes[1], "seconds", "wall time of the run (s)")):
        xs = [r[key] for r in runs]
        ax.plot(xs, [r["coverage"] for r in runs], "o-", label="coverage (any of N right)")
        ax.plot(xs, [r["vote_accuracy"] for r in runs], "s-", label="majority-vote accuracy")
        ax.axhline(acc["greedy_accuracy"], color="gray", ls="--", label="greedy")
        ax.axhline(acc["single_sample_accuracy"], color="gray", ls=":", label="single sample")
        adaptive = result.get("adaptive", [])
        ad_x = [r["mean_samples"] if key == "n" else r["seconds"] for r in adaptive]
        ax.plot(ad_x, [r["accuracy"] for r in adaptive], "D", color="C3", label="adaptive voting")
        ax.set_xscale("log", base=2 if key == "n" else 10)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of items")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    system = result["system"]
    cpu = f"{system.get('cpu_model', '')}, kernels {system['inference_paths']['kernels'].get('isa')}"
    fig.suptitle(f"{result['system'].get('model', '')}: {result['settings']['items']} tasks, {cpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
