#!/usr/bin/env bash
# Issue 14, target 1: no mode slower than float32 on the machine it runs on. Batch-1 decode and a 512-token
# prefill of the default model in each weight mode, modes alternating within each round:
#   bash benchmarks/modes_vs_fp32.sh OUT [ROUNDS] [CLASS]
# CLASS: native or avx2 (as cpu_class.sh). Summary: OUT/summary.json (per mode and round, decode tok/s and
# prefill ms, and each mode's median ratio to float32's); ROUNDS 0 only rewrites it from the files in OUT.
# A round takes ~3 minutes. (Before the weight-only modes had native kernels, int8 and int4 took PyTorch's
# weight-only matmuls, and on an AVX2-only host a round took ~10 minutes, most of it their prefills.)
set -euo pipefail
OUT=$(realpath -m "$1") ROUNDS=${2:-2} CLASS=${3:-native}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GGUF=$(cd "$HERE" && python -c "from kvloom.models.model_source import default_model_path as d; print(d())")
mkdir -p "$OUT"
source "$HERE/benchmarks/servers.sh"   # cap_class
cap_class "$CLASS" "$OUT"
MODES=(none w8a8 gguf int8 int4)
for r in $(seq "$ROUNDS"); do for q in "${MODES[@]}"; do
  kvloom bench latency --model "$GGUF" --quantization "$q" --input-len 8 --output-len 64 --iters 3 \
      --out "$OUT/decode_${q}_r$r.json" > "$OUT/decode_${q}_r$r.log" 2>&1
  kvloom bench latency --model "$GGUF" --quantization "$q" --input-len 512 --output-len 2 --iters 3 \
      --out "$OUT/prefill_${q}_r$r.json" > "$OUT/prefill_${q}_r$r.log" 2>&1
done; done
python - "$OUT" "bash benchmarks/modes_vs_fp32.sh $*" "${MODES[*]}" <<'PY'
import json, os, statistics, sys
out, command, modes = sys.argv[1], sys.argv[2], sys.argv[3].split()
rounds = sorted({int(f.rsplit("_r", 1)[1].split(".")[0]) for f in os.listdir(out) if f.startswith("decode_") and f.endswith(".json")})
def kv(kind, q, r):
    return json.load(open(os.path.join(out, f"{kind}_{q}_r{r}.json")))["kvloom"]
rows = {q: [{"round": r, "decode_tok_s": round(kv("decode", q, r)["decode_tokens_per_s"], 1),
             "prefill512_ms": round(kv("prefill", q, r)["prefill_ms"], 1)} for r in rounds] for q in modes}
ratio = {q: {"decode_vs_fp32": statistics.median(a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(rows[q], rows["none"])),
             "prefill_speed_vs_fp32": statistics.median(b["prefill512_ms"] / a["prefill512_ms"] for a, b in zip(rows[q], rows["none"]))}
         for q in modes}
summary = {"command": command, "cpu_flags": open(os.path.join(out, "cpu_flags.txt")).read().strip(),
           "modes": rows, "median_ratio_to_fp32": {q: {k: round(v, 2) for k, v in d.items()} for q, d in ratio.items()}}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary["median_ratio_to_fp32"], indent=1))
PY
