"""Summarise benchmarks/decode_pairs.sh's output: `python benchmarks/decode_pairs_summary.py OUT [COMMAND]`.

Per pair: llama-bench tgN (tok/s), kvloom's decode tok/s from this tree (and from the base tree when there
is one), their ratios, and the bytes a kvloom step reads with the fraction of the memory floor (at the
bandwidth measured in that run); written to OUT/summary.json with the CPU class the kvloom runs used.
"""
import glob
import json
import os
import sys


def tokens_per_s(path: str) -> float | None:
    if not os.path.exists(path):
        return None
    return round(json.load(open(path))["kvloom"]["decode_tokens_per_s"], 1)


def floor(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    run = json.load(open(path))["kvloom"]
    return {"mb_per_step": round(run["memory_floor"]["bytes_per_step"] / 1e6, 1),
            "bandwidth_gbs": round(run["memory_floor"]["bandwidth_gbs"], 1),
            "fraction_of_floor": round(run["fraction_of_memory_floor"], 2)}


def main(out: str, command: str = "") -> None:
    pairs = []
    for llama in sorted(glob.glob(os.path.join(out, "llama_p*.json"))):
        p = llama.rsplit("_p", 1)[1][:-5]
        n, tg = next((r["n_gen"], r["avg_ts"]) for r in json.load(open(llama)) if r["n_gen"] > 0)
        row = {"pair": int(p), f"llama_bench_tg{n}": round(tg, 1),
               "kvloom": tokens_per_s(os.path.join(out, f"kvloom_p{p}.json")),
               "kvloom_base": tokens_per_s(os.path.join(out, f"base_p{p}.json")),
               "kvloom_floor": floor(os.path.join(out, f"kvloom_p{p}.json")),
               "kvloom_base_floor": floor(os.path.join(out, f"base_p{p}.json"))}
        for name in ("kvloom", "kvloom_base"):
            if row[name] is not None:
                row[f"{name}_vs_llama"] = round(row[name] / tg, 2)
        pairs.append(row)
    pairs.sort(key=lambda r: r["pair"])
    first = json.load(open(os.path.join(out, "kvloom_p1.json")))["stack"]
    kernels = first["inference_paths"]["kernels"]
    summary = {"command": command, "cpu_class": kernels.get("isa"), "cpu_model": first["cpu_model"],
               "load_average_at_end": os.getloadavg(), "pairs": pairs}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
