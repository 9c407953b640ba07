"""Cascade routing on a checkable task set: accuracy against cost for always-small, always-big and the cascade
(kvloom/router/cascade.py) at several thresholds; a LinUCB bandit (kvloom/router/bandit.py) replayed on the same
outcomes. Writes docs/results/router/cascade.json and cascade.png.

    python benchmarks/router_cascade.py [--tasks 80] [--out docs/results/router]

Every task is answered once by each model, one request at a time (greedy, so an answer is the same alone or
batched: the engine's invariance), timing each request; the cascade's outcome at a threshold is then read off
those answers: the small one if its mean token logprob >= the threshold, else the big one, and the big model's
tokens and seconds are counted only for escalated tasks. The cascade's added latency is the small model's time on
the tasks it escalated.

The stand-in (no second real model runs in main yet): "small" is the default model (SmolLM2-135M-Instruct, Q4
GGUF on the native kernels) asked zero-shot; "big" is the same model in the reference mode (--quantization none,
fp32) with three worked examples before the question: a longer, slower request that may answer better. It is a
costlier configuration, not a larger model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from kvloom.llm import LLM  # noqa: E402
from kvloom.router.bandit import LinUCB  # noqa: E402
from kvloom.router.cascade import confidence  # noqa: E402
from kvloom.router.features import FEATURE_NAMES, query_features  # noqa: E402
from kvloom.router.tasks import FEW_SHOT, make_tasks  # noqa: E402
from kvloom.sampling_params import SamplingParams  # noqa: E402
from kvloom.system_info import stack_description  # noqa: E402
from kvloom.kernels.build import cpu_info  # noqa: E402


def chat_prompt(few_shot: bool):
    """(llm, task) -> prompt ids: the question as a chat's user message, after FEW_SHOT's turns if few_shot."""
    def ids(llm: LLM, t) -> list[int]:
        messages = []
        if few_shot:
            for q, a in FEW_SHOT:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": t.question})
        return llm.tokenizer.apply_chat_template(messages)
    return ids


def answer_all(llm: LLM, tasks, prompt_ids, max_tokens: int, stop: list[str] | None = None) -> list[dict]:
    """Each task answered alone, greedy, timed; prompt_ids(llm, task) makes its prompt."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, stop=stop)
    rows = []
    for t in tasks:
        ids = prompt_ids(llm, t)
        started = time.perf_counter()
        out = llm.generate([ids], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - started
        lps = [x.logprob for x in out.logprobs]
        rows.append({"text": out.text, "correct": t.check(out.text), "prompt_tokens": len(ids),
                     "completion_tokens": len(out.token_ids), "seconds": seconds,
                     "mean_logprob": confidence(lps)})
    return rows


def cascade_point(small, big, threshold: float) -> dict:
    escalated = [s["mean_logprob"] < threshold for s in small]
    correct = [b["correct"] if e else s["correct"] for s, b, e in zip(small, big, escalated)]
    n = len(small)
    return {"threshold": threshold, "accuracy": sum(correct) / n, "escalated": sum(escalated) / n,
            "big_tokens_per_task": sum(b["prompt_tokens"] + b["completion_tokens"]
                                       for b, e in zip(big, escalated) if e) / n,
            "big_seconds_per_task": sum(b["seconds"] for b, e in zip(big, escalated) if e) / n,
            "small_seconds_per_task": sum(s["seconds"] for s in small) / n,
            "added_seconds_per_escalated_task": (sum(s["seconds"] for s, e in zip(small, escalated) if e)
                                                 / max(1, sum(escalated)))}


def bandit_replay(tasks, small, big, lam: float, passes: int, seed: int) -> dict:
    """LinUCB over the tasks in order, `passes` times, learning from each checked answer (reward = correct -
    lam * cost, cost 0 small / 1 big); the last pass's picks are scored."""
    bandit = LinUCB(["small", "big"], len(FEATURE_NAMES), seed=seed)
    outcomes = {"small": small, "big": big}
    picks, decide_seconds = [], []
    for p in range(passes):
        picks = []
        for i, t in enumerate(tasks):
            x = query_features(t.question)
            started = time.perf_counter()
            arm, _ = bandit.choose(x)
            decide_seconds.append(time.perf_counter() - started)
            bandit.update(arm, x, float(outcomes[arm][i]["correct"]) - lam * (arm == "big"))
            picks.append(arm)
    n = len(tasks)
    return {"lambda": lam, "passes": passes, "accuracy": sum(outcomes[a][i]["correct"] for i, a in enumerate(picks)) / n,
            "big_share": picks.count("big") / n,
            "big_tokens_per_task": sum(big[i]["prompt_tokens"] + big[i]["completion_tokens"]
                                       for i, a in enumerate(picks) if a == "big") / n,
            "big_seconds_per_task": sum(big[i]["seconds"] for i, a in enumerate(picks) if a == "big") / n,
            "decide_microseconds_median": float(np.median(decide_seconds) * 1e6)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/router")
    ap.add_argument("--answers-from", default=None,
                    help="a cascade.json of an earlier run with the same tasks: its answers are re-scored (the "
                         "checker, the points, the bandit) instead of generated again")
    args = ap.parse_args()
    tasks = make_tasks(args.tasks, args.seed)
    if args.answers_from:
        with open(args.answers_from) as f:
            earlier = json.load(f)
        assert [r["question"] for r in earlier["per_task"]] == [t.question for t in tasks], "not the same tasks"
        small = [{**r["small"], "correct": t.check(r["small"]["text"])} for r, t in zip(earlier["per_task"], tasks)]
        big = [{**r["big"], "correct": t.check(r["big"]["text"])} for r, t in zip(earlier["per_task"], tasks)]
    else:
        small_llm = LLM(None, kv_cache_memory="128MiB")
        small = answer_all(small_llm, tasks, chat_prompt(few_shot=False), args.max_tokens)
        del small_llm
        big_llm = LLM(None, quantization="none", kv_cache_memory="128MiB")
        big = answer_all(big_llm, tasks, chat_prompt(few_shot=True), args.max_tokens)
        del big_llm
    confs = sorted(s["mean_logprob"] for s in small)
    thresholds = sorted({float(np.quantile(confs, q)) for q in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)})
    points = [cascade_point(small, big, -np.inf), *[cascade_point(small, big, t) for t in thresholds],
              cascade_point(small, big, np.inf)]
    points[0]["threshold"], points[-1]["threshold"] = "-inf (always small)", "inf (small, then always big)"
    always_big = {"accuracy": sum(b["correct"] for b in big) / len(big),
                  "big_tokens_per_task": sum(b["prompt_tokens"] + b["completion_tokens"] for b in big) / len(big),
                  "big_seconds_per_task": sum(b["seconds"] for b in big) / len(big)}
    by_kind = {k: {"small": float(np.mean([s["correct"] for s, t in zip(small, tasks) if t.kind == k])),
                   "big": float(np.mean([b["correct"] for b, t in zip(big, tasks) if t.kind == k]))}
               for k in sorted({t.kind for t in tasks})}
    result = {"command": "python benchmarks/router_cascade.py " + " ".join(sys.argv[1:]),
              "stand_in": "small = SmolLM2-135M-Instruct Q4 GGUF zero-shot; big = the same model, --quantization "
                          "none (fp32) with 3 worked examples: a costlier configuration, not a larger model",
              "tasks": args.tasks, "seed": args.seed, "max_tokens": args.max_tokens,
              "always_small": points[0], "always_big": always_big, "cascade": points[1:],
              "accuracy_by_kind": by_kind,
              "bandit": [bandit_replay(tasks, small, big, lam, 3, args.seed) for lam in (0.05, 0.2, 0.5)],
              "per_task": [{"question": t.question, "answer": t.answer, "small": s, "big": b}
                           for t, s, b in zip(tasks, small, big)],
              "cpu_class": cpu_info().isa, "stack": stack_description()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cascade.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "cascade.png"))
    print(json.dumps({k: result[k] for k in ("always_small", "always_big", "cascade", "bandit", "accuracy_by_kind")},
                     indent=1))


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    casc = result["cascade"]
    ax.plot([p["big_seconds_per_task"] for p in casc], [p["accuracy"] for p in casc], "o-", label="cascade (thresholds)")
    s, b = result["always_small"], result["always_big"]
    ax.plot([0], [s["accuracy"]], "s", ms=9, label="always small")
    ax.plot([b["big_seconds_per_task"]], [b["accuracy"]], "^", ms=9, label="always big")
    for bp in result["bandit"]:
        ax.plot([bp["big_seconds_per_task"]], [bp["accuracy"]], "x", ms=9, label=f"bandit λ={bp['lambda']}")
    ax.set_xlabel("big-model seconds per task")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Router on {result['tasks']} checkable tasks ({result['cpu_class']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
