#!/usr/bin/env bash
# Serving throughput of two checkouts, alternated in one sitting (old, new, old, new):
#   bash benchmarks/ab_serve.sh OLD_DIR NEW_DIR OUT_DIR [ROUNDS]
# Each round starts `kvloom serve $SERVE_FLAGS` (default: --quantization w8a8; SERVE_FLAGS= for the
# defaults) from one checkout on 127.0.0.1:8111, sends a burst of 48 requests (100 tokens in, 128 out, all at
# once) with this checkout's `kvloom bench serve`, and stops it.
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-2}
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for name in old new; do
    dir=${!name}
    # shellcheck disable=SC2086
    PYTHONPATH=$dir python -m kvloom.cli serve ${SERVE_FLAGS---quantization w8a8} --port 8111 >"$out/server_${name}_$r.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8111/health >/dev/null && break; sleep 1; done
    python -m kvloom.cli bench serve --base-url http://127.0.0.1:8111 --workload poisson --request-rate inf \
      --num-requests 48 --input-len 100 --output-len 128 --out "$out/${name}_$r.json" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
python - "$out" "bash benchmarks/ab_serve.sh $*" <<'PY'
import glob, json, os, statistics, sys
out, command = sys.argv[1], sys.argv[2]
rounds = []
for path in sorted(glob.glob(os.path.join(out, "new_*.json"))):
    r = path.rsplit("_", 1)[1][:-5]
    old, new = (json.load(open(os.path.join(out, f"{n}_{r}.json")))["summary"] for n in ("old", "new"))
    rounds.append({"round": int(r), "old_out_tok_s": round(old["output_throughput"], 1),
                   "new_out_tok_s": round(new["output_throughput"], 1),
                   "old_tpot_p99_ms": round(old["tpot_ms"]["p99"]), "new_tpot_p99_ms": round(new["tpot_ms"]["p99"]),
                   "new_over_old": round(new["output_throughput"] / old["output_throughput"], 3)})
summary = {"command": command, "serve_flags": os.environ.get("SERVE_FLAGS", "--quantization w8a8"),
           "cpu_flags": sorted(set(f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx2", "avx512")))),
           "rounds": rounds, "median_new_over_old": statistics.median(r["new_over_old"] for r in rounds)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
