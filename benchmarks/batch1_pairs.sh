#!/usr/bin/env bash
# Batch-1 decode, kvloom's defaults against llama-bench tg128, alternating in one sitting (cpu_class.sh's
# batch-1 row, repeated so the ratio has pairs):
#   bash benchmarks/batch1_pairs.sh CLASS LLAMA_CPP_BIN OUT [PAIRS]
# CLASS: native or avx2 (as cpu_class.sh). Summary: OUT/summary.json (per-pair ratios and their median).
set -euo pipefail
CLASS=$1 LLAMA=$2 OUT=$3 PAIRS=${4:-4}
GGUF=$(python -c "from kvloom.models.model_source import default_model_path as d; print(d())")
mkdir -p "$OUT"
source "$(dirname "$0")/servers.sh"
cap_class "$CLASS" "$OUT"
for p in $(seq "$PAIRS"); do
  "$LLAMA/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -r 3 -o json > "$OUT/llama_bench_p$p.json" 2> "$OUT/llama_bench_p$p.log"
  kvloom bench latency --model "$GGUF" --input-len 8 --output-len 128 --iters 3 --out "$OUT/latency_p$p.json" \
      > "$OUT/latency_p$p.log" 2>&1
done
python - "$OUT" "bash benchmarks/batch1_pairs.sh $*" <<'PY'
import glob, json, os, statistics, sys
out, command = sys.argv[1], sys.argv[2]
pairs = []
for p in range(1, len(glob.glob(os.path.join(out, "latency_p*.json"))) + 1):
    llama = next(r for r in json.load(open(os.path.join(out, f"llama_bench_p{p}.json"))) if r["n_gen"] > 0)["avg_ts"]
    kv_tps = json.load(open(os.path.join(out, f"latency_p{p}.json")))["kvloom"]["decode_tokens_per_s"]
    pairs.append({"pair": p, "llama_tg128_tok_s": round(llama, 1), "kvloom_tok_s": round(kv_tps, 1),
                  "ratio": round(kv_tps / llama, 3)})
summary = {"command": command, "cpu_flags": open(os.path.join(out, "cpu_flags.txt")).read().strip(),
           "pairs": pairs, "median_ratio": round(statistics.median(p["ratio"] for p in pairs), 3)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
