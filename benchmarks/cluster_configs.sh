#!/usr/bin/env bash
# One machine, four ways to serve it, alternated in one sitting (every config once per round):
#   bash benchmarks/cluster_configs.sh OUT_DIR [ROUNDS]
#   plain      kvloom serve --num-threads 2                          (one engine, no Ray)
#   front1x2   kvloom serve --ray-address local --instances 1 --threads-per-instance 2   (the cluster front's cost)
#   ray2x1     kvloom serve --instances 2 --threads-per-instance 1   (migration on)
#   ray2x1-nm  the same with --no-migration
# Workloads: a BurstGPT slice and a shared-prefix one, each through `kvloom bench serve`.
# python benchmarks/cluster_configs_summary.py OUT_DIR writes OUT_DIR/summary.json and prints the table.
set -euo pipefail
out=$1 rounds=${2:-2}
mkdir -p "$out"
declare -A flags=(
  [plain]="--num-threads 2"
  [front1x2]="--ray-address local --instances 1 --threads-per-instance 2"
  [ray2x1]="--instances 2 --threads-per-instance 1"
  [ray2x1-nm]="--instances 2 --threads-per-instance 1 --no-migration"
)
declare -A loads=(
  [burstgpt]="--workload burstgpt --num-requests 24 --time-scale 100"
  [prefix]="--workload shared-prefix --num-requests 24 --request-rate 4 --prefix-len 500 --input-len 100 --output-len 64"
)
for r in $(seq "$rounds"); do
  for name in plain front1x2 ray2x1 ray2x1-nm; do
    # shellcheck disable=SC2086
    python -m kvloom.cli serve ${flags[$name]} --port 8112 >"$out/server_${name}_$r.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8112/health >/dev/null && break; sleep 1; done
    for load in burstgpt prefix; do
      # shellcheck disable=SC2086
      python -m kvloom.cli bench serve --base-url http://127.0.0.1:8112 ${loads[$load]} \
        --slo ttft=2s,tpot=200ms --out "$out/${name}_${load}_$r.json" >/dev/null 2>&1
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    ray stop --force >/dev/null 2>&1 || true
  done
done
