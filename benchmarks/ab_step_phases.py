"""Step time of two checkouts, alternated in one sitting: `python benchmarks/ab_step_phases.py OLD_DIR NEW_DIR`.

Runs benchmarks/step_phases.py (w8a8, default model) at batch 1 and 32 from each
checkout in turn (old, new, old, new, ...), so drift of the machine hits both alike,
and writes the per-run step times and the new/old ratio of the medians as JSON.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kvloom.kernels.build import cpu_info  # noqa: E402  (the CPU class goes with every result)


def step_ms(checkout: str, batch: int) -> float:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run([sys.executable, os.path.join(checkout, "benchmarks", "step_phases.py"), "w8a8", str(batch)],
                         env=env, capture_output=True, text=True, check=True, cwd=checkout).stdout
    return float(re.search(r"batch \d+: ([0-9.]+) ms a step", out).group(1))


def _commit(checkout: str) -> str:
    return subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()


def main(old: str, new: str, rounds: int = 3, out: str | None = None) -> None:
    result = {"cpu_isa": cpu_info().isa, "old": _commit(old), "new": _commit(new), "batches": {}}
    for batch in (1, 32):
        runs = {"old": [], "new": []}
        for _ in range(rounds):
            for name, path in (("old", old), ("new", new)):
                runs[name].append(step_ms(path, batch))
        med = {k: statistics.median(v) for k, v in runs.items()}
        result["batches"][str(batch)] = {"step_ms": runs, "median_ms": med, "new_over_old": med["new"] / med["old"]}
        print(f"batch {batch}: old {runs['old']} new {runs['new']} -> new/old {med['new'] / med['old']:.3f}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], out=sys.argv[3] if len(sys.argv) > 3 else None)
