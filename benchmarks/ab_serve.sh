#!/usr/bin/env bash
# Serving throughput of two checkouts, alternated in one sitting (old, new, old, new):
#   bash benchmarks/ab_serve.sh OLD_DIR NEW_DIR OUT_DIR [ROUNDS]
# Each round starts `kvloom serve --quantization w8a8` from one checkout on 127.0.0.1:8111, sends a burst of
# 48 requests (100 tokens in, 128 out, all at once) with this checkout's `kvloom bench serve`, and stops it.
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-2}
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for name in old new; do
    dir=${!name}
    PYTHONPATH=$dir python -m kvloom.cli serve --quantization w8a8 --port 8111 >"$out/server_${name}_$r.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8111/health >/dev/null && break; sleep 1; done
    python -m kvloom.cli bench serve --base-url http://127.0.0.1:8111 --workload poisson --request-rate inf \
      --num-requests 48 --input-len 100 --output-len 128 --out "$out/${name}_$r.json" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
