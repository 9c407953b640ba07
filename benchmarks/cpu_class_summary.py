"""Tables of `benchmarks/cpu_class.sh` results: `python benchmarks/cpu_class_summary.py OUT [--json FILE]`.

One row per target and round: llama.cpp's figure, kvloom's, their ratio (kvloom / llama.cpp, or the
other way for times), and whether the issue-14 goal is met in that round.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _rounds(out: str) -> list[int]:
    return sorted({int(m.group(1)) for p in glob.glob(os.path.join(out, "*_r*.json*"))
                   if (m := re.search(r"_r(\d+)\.json", p))})


def _llama_bench(out, r):
    rows = _load(os.path.join(out, f"llama_bench_r{r}.json"))
    pp = next(x["avg_ts"] for x in rows if x["n_prompt"] == 512 and x["n_gen"] == 0)
    tg = next(x["avg_ts"] for x in rows if x["n_gen"] == 128 and x["n_prompt"] == 0)
    return pp, tg


def _llama_batched(out, r):
    with open(os.path.join(out, f"llama_batched_r{r}.jsonl")) as f:
        row = [json.loads(line) for line in f if line.startswith("{")][-1]
    return row["speed_tg"], row["pl"] * row["tg"] / row["t"]     # decode tok/s; output tok/s with prompts


def _serve(out, name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    s = _load(path)["summary"]
    return {"out_tok_s": s["output_throughput"], "tpot_p99": s["tpot_ms"]["p99"], "ttft_p99": s["ttft_ms"]["p99"],
            "ttft_median": s["ttft_ms"]["median"], "failed": s["failed"]}


def summarize(out: str) -> dict:
    rows = []
    for r in _rounds(out):
        pp, tg = _llama_bench(out, r)
        lat = _load(os.path.join(out, f"latency_r{r}.json"))["kvloom"]
        pre = _load(os.path.join(out, f"prefill512_r{r}.json"))["kvloom"]
        b_tg, b_out = _llama_batched(out, r)
        thr = _load(os.path.join(out, f"throughput32_r{r}.json"))
        thr = thr.get("kvloom", thr)
        kv_pp = 512 / (pre["prefill_ms"] / 1e3)
        res = {"round": r,
               "batch1": {"llama_tg128": tg, "kvloom": lat["decode_tokens_per_s"],
                          "ratio": lat["decode_tokens_per_s"] / tg, "goal": 1.3,
                          "fraction_of_memory_floor": lat.get("fraction_of_memory_floor"),
                          "bandwidth_gbs": lat.get("memory_floor", {}).get("bandwidth_gbs")},
               "prefill512": {"llama_pp512": pp, "kvloom": kv_pp, "ratio": kv_pp / pp, "goal": 3.0},
               "batched32": {"llama_out_tok_s": b_out, "llama_decode_tok_s": b_tg,
                             "kvloom_out_tok_s": thr["output_tokens_per_s"],
                             "ratio": thr["output_tokens_per_s"] / b_out}}
        for mode in ("greedy", "sampled"):
            k, l = _serve(out, f"{mode}_kvloom_r{r}.json"), _serve(out, f"{mode}_llama_r{r}.json")
            if k and l:
                res[f"burst_{mode}"] = {"llama": l, "kvloom": k, "ratio": k["out_tok_s"] / l["out_tok_s"],
                                        "goal": 2.5, "tpot_p99_goal_ms": 100}
        k, l = _serve(out, f"ttft512_kvloom_r{r}.json"), _serve(out, f"ttft512_llama_r{r}.json")
        if k and l:
            res["cold_ttft512"] = {"llama_ms": l["ttft_median"], "kvloom_ms": k["ttft_median"],
                                   "ratio": l["ttft_median"] / k["ttft_median"], "goal": 3.0}
        if "burst_greedy" in res and "burst_sampled" in res:
            res["sampled_over_greedy"] = {
                "kvloom": res["burst_sampled"]["kvloom"]["out_tok_s"] / res["burst_greedy"]["kvloom"]["out_tok_s"],
                "llama": res["burst_sampled"]["llama"]["out_tok_s"] / res["burst_greedy"]["llama"]["out_tok_s"],
                "goal": 0.95}
        rows.append(res)
    return {"cpu_flags": open(os.path.join(out, "cpu_flags.txt")).read().strip(), "rounds": rows}


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def table(summary: dict) -> str:
    lines = ["| target | round | llama.cpp | kvloom (defaults) | ratio | goal | status |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rounds"]:
        n = r["round"]
        b = r["batch1"]
        lines.append(f"| batch-1 decode (tok/s; llama-bench tg128) | {n} | {b['llama_tg128']:.1f} | {b['kvloom']:.1f} "
                     f"| {b['ratio']:.2f}x | >= 1.3x | {_met(b['ratio'] >= 1.3)} |")
        p = r["prefill512"]
        lines.append(f"| prefill 512 (tok/s; llama-bench pp512) | {n} | {p['llama_pp512']:.0f} | {p['kvloom']:.0f} "
                     f"| {p['ratio']:.2f}x | >= 3x | {_met(p['ratio'] >= 3)} |")
        c = r["batched32"]
        lines.append(f"| 32 prompts, 100 in / 128 out (output tok/s; llama-batched-bench) | {n} | "
                     f"{c['llama_out_tok_s']:.1f} | {c['kvloom_out_tok_s']:.1f} | {c['ratio']:.2f}x | | |")
        for mode in ("greedy", "sampled"):
            s = r.get(f"burst_{mode}")
            if s:
                ok = s["ratio"] >= 2.5 and s["kvloom"]["tpot_p99"] <= 100
                lines.append(f"| 48-request burst, {mode} (output tok/s; TPOT p99 ms) | {n} | "
                             f"{s['llama']['out_tok_s']:.1f}; {s['llama']['tpot_p99']:.0f} | "
                             f"{s['kvloom']['out_tok_s']:.1f}; {s['kvloom']['tpot_p99']:.0f} | {s['ratio']:.2f}x "
                             f"| >= 2.5x at <= 100 ms | {_met(ok)} |")
        t = r.get("cold_ttft512")
        if t:
            lines.append(f"| cold TTFT, 512-token prompt (ms, median of 4) | {n} | {t['llama_ms']:.0f} | "
                         f"{t['kvloom_ms']:.0f} | {t['ratio']:.2f}x lower | >= 3x lower | {_met(t['ratio'] >= 3)} |")
        g = r.get("sampled_over_greedy")
        if g:
            lines.append(f"| sampled / greedy burst throughput | {n} | {g['llama']:.2f} | {g['kvloom']:.2f} | | "
                         f">= 0.95 | {_met(g['kvloom'] >= 0.95)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()
    s = summarize(args.out)
    print(f"CPU flags: {s['cpu_flags']}\n")
    print(table(s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
