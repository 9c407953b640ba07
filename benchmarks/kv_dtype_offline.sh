#!/usr/bin/env bash
# One offline run of 48 prompts (100 tokens in, 128 out) at a KV dtype; run it alternating with another dtype
# (run_all.sh does), or under an A/B timer such as farm-bench:
#   farm-bench -n 4 --warmup 0 --timeout 900 --vs 'bash benchmarks/kv_dtype_offline.sh CLASS float32 OUT' \
#       -- bash benchmarks/kv_dtype_offline.sh CLASS float16 OUT
# CLASS: native or avx2 (kvloom's kernels, PyTorch and oneDNN capped at AVX2). Each run writes
# OUT/KV_<pid>.json (`kvloom bench throughput`'s own figures, CPU class included).
set -euo pipefail
CLASS=$1 KV=$2 OUT=$3
mkdir -p "$OUT"
if [ "$CLASS" = avx2 ]; then export KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2; fi
export HF_HUB_OFFLINE=1
exec kvloom bench throughput --num-prompts 48 --input-len 100 --output-len 128 --kv-cache-dtype "$KV" \
    --out "$OUT/${KV}_$$.json" > /dev/null 2>&1
