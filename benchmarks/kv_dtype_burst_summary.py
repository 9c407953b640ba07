"""The table of benchmarks/kv_dtype_burst.sh's runs: `python benchmarks/kv_dtype_burst_summary.py OUT`."""
import glob
import json
import os
import re
import sys


def main() -> None:
    out = sys.argv[1]
    runs: dict[int, dict[str, dict]] = {}
    for path in glob.glob(os.path.join(out, "burst_*_r*.json")):
        kv, r = re.match(r"burst_(\w+?)_r(\d+)\.json", os.path.basename(path)).groups()
        runs.setdefault(int(r), {})[kv] = json.load(open(path))["summary"]
    flags = open(os.path.join(out, "cpu_flags.txt")).read().split()
    print(f"CPU flags: {' '.join(flags)}\n")
    print("| round | float32 KV tok/s (TPOT p99 ms) | float16 KV tok/s (TPOT p99 ms) | float16 / float32 |")
    print("|---|---|---|---|")
    for r in sorted(runs):
        a, b = runs[r].get("float32"), runs[r].get("float16")
        if a is None or b is None:
            continue
        cell = lambda s: f"{s['output_throughput']:.1f} ({s['tpot_ms']['p99']:.0f})"
        print(f"| {r} | {cell(a)} | {cell(b)} | {b['output_throughput'] / a['output_throughput']:.2f}x |")


if __name__ == "__main__":
    main()
