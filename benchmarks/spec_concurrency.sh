#!/usr/bin/env bash
# Lookahead speculation against plain decoding at 16 and 32 concurrent requests (defaults and w8a8), and at
# 1 on the repetitive and the poisson workloads, where it should still win (issue 14, target 7):
#   bash benchmarks/spec_concurrency.sh OUT [ROUNDS]
# Each `kvloom bench spec` warms both engines up, then serves ROUNDS sets of new prompts with each engine,
# alternating which goes first. Summarize with `python benchmarks/spec_summary.py OUT`.
set -euo pipefail
OUT=$1 ROUNDS=${2:-3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
for q in auto w8a8; do
  for c in 16 32; do
    kvloom bench spec --quantization "$q" --workload poisson --num-requests $((2 * c)) --concurrency "$c" \
        --output-len 96 --rounds "$ROUNDS" --out "$OUT/${q}_c$c.json" > "$OUT/${q}_c$c.log" 2>&1
  done
done
kvloom bench spec --workload repetitive --num-requests 8 --concurrency 1 --rounds "$ROUNDS" \
    --out "$OUT/auto_c1_repetitive.json" > "$OUT/auto_c1_repetitive.log" 2>&1
kvloom bench spec --workload poisson --num-requests 8 --concurrency 1 --output-len 128 --rounds "$ROUNDS" \
    --out "$OUT/auto_c1_poisson.json" > "$OUT/auto_c1_poisson.log" 2>&1
python "$(dirname "$0")/spec_summary.py" "$OUT"
