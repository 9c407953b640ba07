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
source "$(dirname "$0")/servers.sh"
cap_class "$CLASS" "$OUT"
"$LLAMA/llama-bench" --version > "$OUT/llama_version.txt" 2>&1 || true
python -m kvloom.kernels build > "$OUT/kernels.txt" 2>&1

serve_runs() {  # $1: round; each serving figure for kvloom, then for llama-server
  local r=$1 url="http://127.0.0.1:$PORT"
  for mode in greedy sampled ttft512; do for label in kvloom llama; do
    start_server "$label" "$OUT/${label}_server_${mode}_r$r.log" 16384   # 1,024 tokens a slot
    case $mode in
      greedy) args=("${BURST[@]}") ;;
      sampled) args=("${BURST[@]}" --temperature 0.7 --top-p 0.95) ;;
      # Cold time to first token of a 512-token prompt: one request at a time, a new prompt each.
      ttft512) args=(--workload poisson --request-rate inf --max-concurrency 1 --num-requests 4 --input-len 512 --output-len 4) ;;
    esac
    kvloom bench serve --base-url "$url" --tokenizer "$GGUF" "${args[@]}" --out "$OUT/${mode}_${label}_r$r.json" \
        > "$OUT/${mode}_${label}_r$r.log" 2>&1
    kill "$server"; wait "$server" || true
  done; done
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

  serve_runs "$r"
done
echo "done: $OUT"
