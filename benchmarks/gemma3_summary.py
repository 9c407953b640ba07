"""Summary of benchmarks/gemma3_vs_llamacpp.sh's result files: OUT/summary.json and a markdown table.

    python benchmarks/gemma3_summary.py OUT
"""
from __future__ import annotations

import glob
import json
import os
import sys


def main(out: str) -> None:
    pairs = []
    for path in sorted(glob.glob(os.path.join(out, "latency_*.json"))):
        i = path.rsplit("_", 1)[1].split(".")[0]
        kv = json.load(open(path))["kvloom"]["decode_tokens_per_s"]
        llama = next(r["avg_ts"] for r in json.load(open(os.path.join(out, f"llama_bench_{i}.json")))
                     if r["n_gen"] > 0)
        pairs.append({"pair": int(i), "llama_cpp_tg128_tok_s": llama, "kvloom_decode_tok_s": kv, "ratio": kv / llama})
    summary = {"batch1": pairs}
    batched = os.path.join(out, "llama_batched.jsonl")
    thr = os.path.join(out, "throughput8.json")
    if os.path.exists(batched) and os.path.exists(thr):
        row = [json.loads(line) for line in open(batched) if line.strip()][-1]
        llama = row["pl"] * row["tg"] / row["t"]
        kv = json.load(open(thr))["kvloom"]["output_tokens_per_s"]
        summary["batched"] = {"prompts": row["pl"], "input_len": row["pp"], "output_len": row["tg"],
                              "llama_cpp_output_tok_s": llama, "kvloom_output_tok_s": kv, "ratio": kv / llama}
    stack = json.load(open(sorted(glob.glob(os.path.join(out, "latency_*.json")))[0])).get("stack")
    summary["kvloom_stack"] = stack
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print("| figure | llama.cpp | kvloom | ratio |\n|---|---|---|---|")
    for p in pairs:
        print(f"| batch-1 decode, pair {p['pair']} (tok/s; tg128 / 8 in, 128 out) | {p['llama_cpp_tg128_tok_s']:.1f} "
              f"| {p['kvloom_decode_tok_s']:.1f} | {p['ratio']:.2f}x |")
    if "batched" in summary:
        b = summary["batched"]
        print(f"| {b['prompts']} prompts, {b['input_len']} in / {b['output_len']} out (output tok/s) "
              f"| {b['llama_cpp_output_tok_s']:.1f} | {b['kvloom_output_tok_s']:.1f} | {b['ratio']:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
