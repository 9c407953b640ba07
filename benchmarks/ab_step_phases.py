"""Step time of two checkouts, alternated in one sitting:
`python benchmarks/ab_step_phases.py OLD_DIR NEW_DIR [OUT] [--quantization Q] [--rounds N] [--steps N]
[--batches 1,32]`.

Runs benchmarks/step_phases.py (default: w8a8, the default model) at each batch size with each checkout's
package in turn (old, new, old, new, ...), so drift of the machine hits both alike, and writes the per-run
step times, each pair's new/old ratio and the ratio of the medians as JSON. The script itself is this
tree's, so both checkouts are timed the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kvloom.kernels.build import cpu_info, requested_isa  # noqa: E402  (the CPU class goes with every result)


def step_ms(checkout: str, batch: int, quantization: str, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_phases.py")
    out = subprocess.run([sys.executable, script, quantization, str(batch), "stack", "default", str(steps)],
                         env=env, capture_output=True, text=True, check=True, cwd=checkout).stdout
    return float(re.search(r"batch \d+: ([0-9.]+) ms a step", out).group(1))


def _commit(checkout: str) -> str:
    return subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--quantization", default="w8a8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    a = ap.parse_args()
    result = {"cpu_isa": cpu_info().isa, "kvloom_isa": requested_isa(), "old": _commit(a.old), "new": _commit(a.new), "quantization": a.quantization,
              "steps": a.steps, "batches": {}}
    for batch in (int(b) for b in a.batches.split(",")):
        runs = {"old": [], "new": []}
        for _ in range(a.rounds):
            for name, path in (("old", a.old), ("new", a.new)):
                runs[name].append(step_ms(path, batch, a.quantization, a.steps))
        med = {k: statistics.median(v) for k, v in runs.items()}
        pairs = [n / o for o, n in zip(runs["old"], runs["new"])]
        result["batches"][str(batch)] = {"step_ms": runs, "median_ms": med, "new_over_old": med["new"] / med["old"],
                                         "pair_ratios": pairs, "new_faster_in": sum(r < 1 for r in pairs)}
        print(f"batch {batch}: old {runs['old']} new {runs['new']} -> new/old {med['new'] / med['old']:.3f}, "
              f"new faster in {sum(r < 1 for r in pairs)} of {len(pairs)} pairs")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
