"""The table of `bench spec` runs in a folder: `python benchmarks/spec_summary.py OUT` (writes OUT/summary.json)."""
import glob
import json
import os
import sys


def main(out: str) -> None:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*_c*.json"))):
        r = json.load(open(path))
        rows.append({"file": os.path.basename(path), "workload": r["workload"], "concurrency": r["concurrency"],
                     "quantization": r["system"]["quantization"],
                     "cpu_class": r["system"]["inference_paths"]["kernels"]["isa"],
                     "per_round": r["throughput_per_round"], "median_round_ratio": r["median_round_ratio"],
                     "throughput_speedup": r["throughput_speedup"], "decode_speedup": r["decode_speedup"],
                     "plain_tokens_per_s": r["none"]["throughput_tokens_per_s"],
                     "lookahead_tokens_per_s": r["lookahead"]["throughput_tokens_per_s"],
                     "acceptance_rate": r["lookahead"]["speculation"]["acceptance_rate"],
                     "guard": r["lookahead"]["speculation"].get("guard")})
    classes = sorted({r["cpu_class"] for r in rows})
    cls = classes[0] if len(classes) == 1 else classes
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"cpu_class": cls, "rows": rows}, f, indent=1)
    print(f"CPU class: {cls}\n")
    print("| mode | workload | concurrency | plain / lookahead tok/s (all rounds) | ratio | per-round ratios |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["workload"], str(r["quantization"]), r["concurrency"])):
        ratios = ", ".join(f"{x['ratio']:.2f}" for x in r["per_round"])
        print(f"| {r['quantization']} | {r['workload']} | {r['concurrency']} | {r['plain_tokens_per_s']:.1f} / "
              f"{r['lookahead_tokens_per_s']:.1f} | {r['throughput_speedup']:.2f}x | {ratios} |")


if __name__ == "__main__":
    main(sys.argv[1])
