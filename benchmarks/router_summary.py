"""The README's router tables from benchmarks/router_two_models.py's result file (markdown on stdout).

    python benchmarks/router_summary.py docs/results/router/two_models.json
"""
from __future__ import annotations

import json
import sys


def _threshold(p: dict) -> str:
    t = p["threshold"]
    return t if isinstance(t, str) else f"{t:.2f}"


def policy_table(o: dict) -> str:
    """One orientation (small -> big): every policy's accuracy and what the big model cost."""
    lines = ["| policy | accuracy | escalated / big share | big tokens per task | big seconds per task "
             "| latency per task (s) |", "|---|---|---|---|---|---|"]

    def row(name, p, share):
        lines.append(f"| {name} | {p['accuracy']:.3f} | {share:.2f} | {p['big_tokens_per_task']:.1f} "
                     f"| {p['big_seconds_per_task']:.3f} | {p['latency_per_task']:.3f} |")
    row(f"always small ({o['small']})", o["always_small"], 0.0)
    for p in o["cascade"][:-1]:
        row(f"cascade, threshold {_threshold(p)}", p, p["escalated"])
    row("cascade, threshold inf (small, then always big)", o["cascade"][-1], 1.0)
    row(f"always big ({o['big']})", o["always_big"], 1.0)
    for b in o["bandit_online"]:
        row(f"bandit λ={b['lambda']}, online (one pass)", b, b["big_share"])
    return "\n".join(lines)


def model_table(result: dict) -> str:
    kinds = sorted(next(iter(result["per_model"].values()))["accuracy_by_kind"])
    lines = ["| model | accuracy | " + " | ".join(kinds) + " | seconds per task (mean / median) "
             "| tokens per task (prompt + answer) |", "|---|---|" + "---|" * len(kinds) + "---|---|"]
    for name, m in result["per_model"].items():
        lines.append(f"| {name} | {m['accuracy']:.3f} | " + " | ".join(f"{m['accuracy_by_kind'][k]:.2f}" for k in kinds)
                     + f" | {m['seconds_per_task']:.3f} / {m['seconds_per_task_median']:.3f} "
                       f"| {m['prompt_tokens_per_task']:.1f} + {m['completion_tokens_per_task']:.1f} |")
    return "\n".join(lines)


def latency_lines(result: dict) -> str:
    d, s = result["router_decision_microseconds"], result["server_check"]
    added = result["cascade"]["cascade"]
    mid = min(added[:-1], key=lambda p: abs(p["escalated"] - 0.5))
    return "\n".join([
        f"- router's own work per request (median): cascade confidence {d['cascade_confidence']:.1f} µs, bandit "
        f"features and choice {d['bandit_features_and_choice']:.1f} µs",
        f"- an escalated task first pays the small model's answer: {mid['added_seconds_per_escalated_task']:.3f} s "
        f"per escalated task at threshold {_threshold(mid)}",
        f"- through the server (cascade route at threshold {s['threshold']:.2f}, {s['tasks']} tasks, "
        f"{s['escalated']} escalated): route minus the same requests sent straight to the model(s) it used, median "
        f"{s['added_ms_median']:.1f} ms (escalated {_ms(s['added_ms_median_escalated'])}, not escalated "
        f"{_ms(s['added_ms_median_not_escalated'])}); decisions as offline {s['same_decisions_as_offline']}/"
        f"{s['tasks']}, answers as offline {s['same_answers_as_offline']}/{s['tasks']}"])


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def main(path: str) -> None:
    result = json.load(open(path))
    print(model_table(result), end="\n\n")
    print(policy_table(result["cascade"]), end="\n\n")
    print(latency_lines(result), end="\n\n")
    print(f"Reverse ({result['reverse']['small']} first, escalating to {result['reverse']['big']}):", end="\n\n")
    print(policy_table(result["reverse"]))


if __name__ == "__main__":
    main(sys.argv[1])
