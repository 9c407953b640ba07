#!/usr/bin/env bash
# Batch-1 decode, kvloom against llama-bench tg128, taken in alternating pairs (the VM's speed drifts):
#   [GGUF=FILE] [TOKENS=128] bash benchmarks/decode_pairs.sh LLAMA_CPP_BIN OUT [PAIRS] [BASE_TREE]
# Each pair: llama-bench -t 2 -p 0 -n TOKENS -r 3, then `kvloom bench latency --input-len 8 --output-len TOKENS
# --iters 3` from this tree, then (with BASE_TREE, another kvloom checkout) the same from that tree. GGUF: the
# model (default: the built-in). Writes the tools' JSON under OUT and OUT/summary.json
# (python benchmarks/decode_pairs_summary.py OUT).
set -euo pipefail
LLAMA=$1 OUT=$(realpath -m "$2") PAIRS=${3:-3} BASE=${4:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GGUF=${GGUF:-$(cd "$HERE" && python -c "from kvloom.models.model_source import default_model_path as d; print(d())")}
TOKENS=${TOKENS:-128}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
latency() {  # $1: tree, $2: output name
  (cd "$1" && PYTHONPATH="$1" python -m kvloom.cli bench latency --model "$GGUF" --input-len 8 --output-len "$TOKENS" \
      --iters 3 --out "$OUT/$2.json" > "$OUT/$2.log" 2>&1)
}
for p in $(seq "$PAIRS"); do
  "$LLAMA/llama-bench" -m "$GGUF" -t 2 -p 0 -n "$TOKENS" -r 3 -o json > "$OUT/llama_p$p.json" 2> "$OUT/llama_p$p.log"
  latency "$HERE" "kvloom_p$p"
  if [ -n "$BASE" ]; then latency "$BASE" "base_p$p"; fi
done
python "$HERE/benchmarks/decode_pairs_summary.py" "$OUT" "GGUF=$GGUF TOKENS=$TOKENS bash benchmarks/decode_pairs.sh $*"
