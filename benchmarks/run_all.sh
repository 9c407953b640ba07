#!/usr/bin/env bash
# Reproduces every number in docs/performance.md on this machine (default model, 2 threads).
# Runs one benchmark at a time: they share the CPU and would disturb each other.
set -euo pipefail
OUT=${OUT:-results}
PORT=${PORT:-8011}
mkdir -p "$OUT"
kvloom bench latency --input-len 128 --output-len 128 --out "$OUT/latency.json" > "$OUT/latency.log" 2>&1
kvloom bench throughput --num-prompts 64 --input-len 100 --output-len 128 --out "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1
kvloom bench peers --num-prompts 32 --input-len 100 --output-len 128 --out "$OUT/peers.json" > "$OUT/peers.log" 2>&1
kvloom bench prefix --prefix-len 1000 --num-requests 8 --out "$OUT/prefix.json" > "$OUT/prefix.log" 2>&1

kvloom serve --port "$PORT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done
URL="http://127.0.0.1:$PORT"
kvloom bench serve --base-url "$URL" --workload poisson --request-rate inf --num-requests 64 \
    --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms --out "$OUT/serve_64.json" > "$OUT/serve_64.log" 2>&1
kvloom bench serve --base-url "$URL" --workload burstgpt --num-requests 100 --time-scale 100 \
    --slo ttft=2s,tpot=100ms --out "$OUT/serve_burstgpt.json" > "$OUT/serve_burstgpt.log" 2>&1
kvloom bench serve --base-url "$URL" --workload shared-prefix --request-rate 1 --num-requests 24 \
    --prefix-len 1000 --input-len 50 --output-len 32 --out "$OUT/serve_shared_prefix.json" > "$OUT/serve_shared_prefix.log" 2>&1
kvloom bench sweep --base-url "$URL" --workload poisson --rates 0.5,1,2,inf --num-requests 24 \
    --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
kill -TERM $SERVER; wait $SERVER || true
echo done
