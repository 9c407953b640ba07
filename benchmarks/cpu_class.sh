#!/usr/bin/env bash
# kvloom's defaults against llama.cpp's on one CPU class, in one sitting (issue 14's targets):
#   bash benchmarks/cpu_class.sh CLASS LLAMA_CPP_BIN OUT [ROUNDS] [MODEL.gguf]
# CLASS: native (what this CPU has) or avx2 (kvloom's kernels, PyTorch and oneDNN capped at AVX2; pass a
# llama.cpp built with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF). Each round runs every kvloom
# figure next to the llama.cpp one it is compared with, one after the other (the VM's speed drifts:
# compare within a round). Writes JSON (and the tools' own output) under OUT; summarize with
# `python benchmarks/cpu_class_summary.py OUT`. ~10 minutes a round for the default model.
set -euo pipefail
CLASS=$1 LLAMA=$2 OUT=$3 ROUNDS=${4:-2}
GGUF=${5:-$(python -c "from kvloom.models.model_source import default_model_path as d; print(d())")}
PORT=${PORT:-8137}
mkdir -p "$OUT"
if [ "$CLASS" = avx2 ]; then
  export KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2
fi
export HF_HUB_OFFLINE=1
grep -o 'avx512[a-z_]*\|avx2\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$OUT/cpu_flags.txt"
"$LLAMA/llama-bench" --version > "$OUT/llama_version.txt" 2>&1 || true
python -m kvloom.kernels build > "$OUT/kernels.txt" 2>&1

wait_for() { for _ in $(seq 600); do curl -sf "$1" > /dev/null && return 0; sleep 1; done; return 1; }

serve_runs() {  # $1: label, $2: url, $3: round
  local label=$1 url=$2 r=$3
  kvloom bench serve --base-url "$url" --tokenizer "$GGUF" --workload poisson --request-rate inf \
      --num-requests 48 --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms \
      --out "$OUT/burst_greedy_${label}_r$r.json" > "$OUT/burst_greedy_${label}_r$r.log" 2>&1
  kvloom bench serve --base-url "$url" --tokenizer "$GGUF" --workload poisson --request-rate inf \
      --num-requests 48 --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms --temperature 0.7 --top-p 0.95 \
      --out "$OUT/burst_sampled_${label}_r$r.json" > "$OUT/burst_sampled_${label}_r$r.log" 2>&1
  # Cold time to first token of a 512-token prompt: one request at a time, a new prompt each.
  kvloom bench serve --base-url "$url" --tokenizer "$GGUF" --workload poisson --request-rate 0.2 \
      --num-requests 4 --input-len 512 --output-len 4 --seed "$r" \
      --out "$OUT/ttft512_${label}_r$r.json" > "$OUT/ttft512_${label}_r$r.log" 2>&1
}

for r in $(seq "$ROUNDS"); do
  "$LLAMA/llama-bench" -m "$GGUF" -t 2 -p 512 -n 128 -r 3 -o json > "$OUT/llama_bench_r$r.json" 2> "$OUT/llama_bench_r$r.log"
  kvloom bench latency --model "$GGUF" --input-len 8 --output-len 128 --iters 3 --out "$OUT/latency_r$r.json" \
      > "$OUT/latency_r$r.log" 2>&1
  kvloom bench latency --model "$GGUF" --input-len 512 --output-len 8 --iters 3 --out "$OUT/prefill512_r$r.json" \
      > "$OUT/prefill512_r$r.log" 2>&1
  "$LLAMA/llama-batched-bench" -m "$GGUF" -t 2 -c 16384 -b 2048 -ub 512 -npp 100 -ntg 128 -npl 32 \
      --output-format jsonl > "$OUT/llama_batched_r$r.jsonl" 2> "$OUT/llama_batched_r$r.log"
  kvloom bench throughput --model "$GGUF" --num-prompts 32 --input-len 100 --output-len 128 \
      --out "$OUT/throughput32_r$r.json" > "$OUT/throughput32_r$r.log" 2>&1

  kvloom serve "$GGUF" --port "$PORT" > "$OUT/kvloom_server_r$r.log" 2>&1 &
  server=$!
  wait_for "http://127.0.0.1:$PORT/health"
  serve_runs kvloom "http://127.0.0.1:$PORT" "$r"
  kill "$server"; wait "$server" || true

  "$LLAMA/llama-server" -m "$GGUF" -t 2 -np 16 -c 16384 --port "$PORT" > "$OUT/llama_server_r$r.log" 2>&1 &
  server=$!
  wait_for "http://127.0.0.1:$PORT/health"
  serve_runs llama "http://127.0.0.1:$PORT" "$r"
  kill "$server"; wait "$server" || true
done
echo "done: $OUT"
