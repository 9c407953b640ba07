"""Table of benchmarks/cluster_configs.sh's results: per config and workload, the median over rounds, and
each config's throughput against `plain` round by round (only same-round ratios count on this machine).

    python benchmarks/cluster_configs_summary.py OUT_DIR      # writes OUT_DIR/summary.json, prints markdown
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics
import sys

CONFIGS = ["plain", "front1x2", "ray2x1", "ray2x1-nm"]


def main(out: str) -> None:
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for path in glob.glob(os.path.join(out, "*.json")):
        m = re.fullmatch(r"(.+)_(burstgpt|prefix)_(\d+)\.json", os.path.basename(path))
        if m:
            runs.setdefault((m[1], m[2]), {})[int(m[3])] = json.load(open(path))["summary"]
    rows = []
    for load in ("burstgpt", "prefix"):
        base = runs.get(("plain", load), {})
        for name in CONFIGS:
            got = runs.get((name, load))
            if not got:
                continue
            med = lambda f: statistics.median(f(s) for s in got.values())   # noqa: E731
            ratios = [got[r]["output_throughput"] / base[r]["output_throughput"] for r in got if r in base]
            rows.append({"config": name, "workload": load, "rounds": len(got),
                         "failed": sum(s["failed"] for s in got.values()),
                         "output_tok_s": med(lambda s: s["output_throughput"]),
                         "ttft_p99_ms": med(lambda s: s["ttft_ms"]["p99"]),
                         "tpot_p99_ms": med(lambda s: s["tpot_ms"]["p99"]),
                         "goodput_req_s": med(lambda s: s.get("goodput", float("nan"))),
                         "throughput_vs_plain": ratios})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("| workload | config | out tok/s | vs plain (per round) | TTFT p99 ms | TPOT p99 ms | goodput req/s | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = ", ".join(f"{x:.2f}" for x in r["throughput_vs_plain"])
        print(f"| {r['workload']} | {r['config']} | {r['output_tok_s']:.1f} | {vs} | {r['ttft_p99_ms']:.0f} | "
              f"{r['tpot_p99_ms']:.0f} | {r['goodput_req_s']:.2f} | {r['failed']} |")


if __name__ == "__main__":
    main(sys.argv[1])
