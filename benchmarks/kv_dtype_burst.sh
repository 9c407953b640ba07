#!/usr/bin/env bash
# The default server's burst with float32 KV and with float16 KV (what auto picks for quantized weights),
# alternated in one sitting:
#   bash benchmarks/kv_dtype_burst.sh CLASS OUT [ROUNDS] [MODEL.gguf]
# CLASS: native or avx2 (kvloom's kernels, PyTorch and oneDNN capped at AVX2). Each round starts
# `kvloom serve` with `--kv-cache-dtype float32`, then `float16`, and sends each the 48-request burst
# (100 tokens in, 128 out, all at once; greedy), as cpu_class.sh does. Summary: kv_dtype_burst_summary.py OUT.
set -euo pipefail
CLASS=$1 OUT=$2 ROUNDS=${3:-2}
GGUF=${4:-$(python -c "from kvloom.models.model_source import default_model_path as d; print(d())")}
PORT=${PORT:-8137}
mkdir -p "$OUT"
source "$(dirname "$0")/servers.sh"
cap_class "$CLASS" "$OUT"
python -m kvloom.kernels build > "$OUT/kernels.txt" 2>&1
for r in $(seq "$ROUNDS"); do
  for kv in float32 float16; do
    KVLOOM_SERVE_FLAGS="--kv-cache-dtype $kv" start_server kvloom "$OUT/server_${kv}_r$r.log"
    kvloom bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$GGUF" "${BURST[@]}" \
        --out "$OUT/burst_${kv}_r$r.json" > "$OUT/burst_${kv}_r$r.log" 2>&1
    kill "$server"; wait "$server" || true
  done
done
echo "done: $OUT"
