#!/usr/bin/env bash
# A model with Llama-3.2-1B's shapes, where decode is memory-bound: kvloom's defaults against llama.cpp's on
# the same Q4_0 GGUF, in one sitting (issue 14, target 9):
#   python benchmarks/make_1b_model.py DIR            # random weights, Q4_0 and Q8_0 GGUF (+ safetensors)
#   bash benchmarks/model_1b.sh DIR/llama1b-Q4_0.gguf LLAMA_CPP_BIN OUT
# Batch 1 (llama-bench tg64 / kvloom bench latency), 16 prompts of 100 in / 64 out (llama-batched-bench /
# kvloom bench throughput) and a 16-request serving burst on fresh servers. ~15 minutes.
set -euo pipefail
GGUF=$1 LLAMA=$2 OUT=$3
PORT=${PORT:-8138}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
grep -o 'avx512[a-z_]*\|avx2\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$OUT/cpu_flags.txt"
source "$(dirname "$0")/servers.sh"

"$LLAMA/llama-bench" -m "$GGUF" -t 2 -p 512 -n 64 -r 2 -o json > "$OUT/llama_bench.json" 2> "$OUT/llama_bench.log"
kvloom bench latency --model "$GGUF" --input-len 8 --output-len 64 --iters 2 --out "$OUT/latency.json" \
    > "$OUT/latency.log" 2>&1
kvloom bench latency --model "$GGUF" --input-len 512 --output-len 4 --iters 2 --out "$OUT/prefill512.json" \
    > "$OUT/prefill512.log" 2>&1
"$LLAMA/llama-batched-bench" -m "$GGUF" -t 2 -c 8192 -b 2048 -ub 512 -npp 100 -ntg 64 -npl 16 \
    --output-format jsonl > "$OUT/llama_batched.jsonl" 2> "$OUT/llama_batched.log"
kvloom bench throughput --model "$GGUF" --num-prompts 16 --input-len 100 --output-len 64 \
    --out "$OUT/throughput16.json" > "$OUT/throughput16.log" 2>&1
for label in kvloom llama; do
  start_server "$label" "$OUT/${label}_server.log" 8192
  kvloom bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$GGUF" --workload poisson --request-rate inf \
      --num-requests 16 --input-len 100 --output-len 64 --out "$OUT/burst_$label.json" > "$OUT/burst_$label.log" 2>&1
  kill "$server"; wait "$server" || true
done
echo "done: $OUT"
