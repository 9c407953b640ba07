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
          f"alternated; medians over {max(w['round'] for w in r['windows'])} rounds):\n")
    print("| | serving alone | serving + fine-tuning job | training alone |")
    print("|---|---|---|---|")
    print(f"| output tok/s | {s['serve_alone_output_tok_s']:.1f} | {s['serve_with_job_output_tok_s']:.1f} | - |")
    print(f"| TPOT median / p99 (ms) | {s['tpot_median_ms_alone']:.0f} / {s['tpot_p99_ms_alone']:.0f} | "
          f"{s['tpot_median_ms_with_job']:.0f} / {s['tpot_p99_ms_with_job']:.0f} | - |")
    print(f"| training tok/s | - | {s['train_tok_s_coserved']:.1f} | {s['train_tok_s_alone']:.1f} |")
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
