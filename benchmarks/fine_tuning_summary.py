"""The fine-tuning tables of the README, printed from a result of benchmarks/fine_tuning_coserve.py.

    python benchmarks/fine_tuning_summary.py docs/results/fine_tuning/coserve.json
"""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    s = r["summary"]
    print(f"Measured with `{r['command']}` ({r['cpu_class']}, {r['load']}, windows of {r['window_s']:.0f} s "
          f"alternated):\n")
    print("| round | window | output tok/s | TPOT median / p99 (ms) | training tok/s |")
    print("|---|---|---|---|---|")
    names = {"serve": "serving alone", "both": "serving + fine-tuning job", "train": "fine-tuning alone"}
    for w in r["windows"]:
        sv, tr = w.get("serving"), w.get("training")
        serving = (f"{sv['output_throughput']:.1f} | {sv['tpot_ms']['median']:.0f} / {sv['tpot_ms']['p99']:.0f}"
                   if sv else "- | -")
        print(f"| {w['round']} | {names[w['kind']]} | {serving} | {tr['tokens_per_s']:.1f} |" if tr else
              f"| {w['round']} | {names[w['kind']]} | {serving} | - |")
    if r.get("note"):
        print(f"\n{r['note']}")
    learn = r.get("learning")
    if learn is None:
        return
    print(f"\nThe learning run ({learn['train_examples']} examples, {learn['epochs']} epochs, alone): "
          f"{learn['status']} in {learn['seconds']:.0f} s, {learn['trained_tokens']} tokens; loss "
          f"{learn['losses'][0]:.2f} -> {learn['losses'][-1]:.2f} (last step). Held-out questions answered in "
          f"the trained format: base model {learn['base']['follows_format']}/{learn['base']['of']}, adapter "
          f"{learn['adapter']['follows_format']}/{learn['adapter']['of']}.")


if __name__ == "__main__":
    main(sys.argv[1])
