#!/usr/bin/env bash
# The 48-request serving burst (issue 14's target 2) with `kvloom serve` as it starts by default and with
# `--speculative lookahead`, the two taking turns (issue 14, target 7: can lookahead be on by default?):
#   bash benchmarks/spec_burst.sh OUT [ROUNDS] [sampled]
# Each run starts a fresh server, sends the burst with `kvloom bench serve` (greedy, or at temperature 0.7 /
# top-p 0.95 with "sampled") and stops it. Table: the summary printed at the end (OUT/summary.json).
set -euo pipefail
OUT=$1 ROUNDS=${2:-3} MODE=${3:-greedy}
PORT=${PORT:-8123}
GGUF=${GGUF:-$(python -c "from kvloom.models.model_source import default_model_path as d; print(d())")}
mkdir -p "$OUT"
source "$(dirname "$0")/servers.sh"
cap_class native "$OUT"
sampling=()
if [ "$MODE" = sampled ]; then sampling=(--temperature 0.7 --top-p 0.95); fi
for r in $(seq "$ROUNDS"); do
  order=(plain lookahead)
  if [ $((r % 2)) = 0 ]; then order=(lookahead plain); fi
  for name in "${order[@]}"; do
    KVLOOM_SERVE_FLAGS=$([ "$name" = lookahead ] && echo "--speculative lookahead" || true) \
        start_server kvloom "$OUT/server_${name}_r$r.log"
    kvloom bench serve --base-url "http://127.0.0.1:$PORT" "${BURST[@]}" "${sampling[@]}" \
        --out "$OUT/${name}_r$r.json" > "$OUT/${name}_r$r.log" 2>&1
    kill "$server"; wait "$server" || true
  done
done
python - "$OUT" "bash benchmarks/spec_burst.sh $*" <<'PY'
import glob, json, os, statistics, sys
out, command = sys.argv[1], sys.argv[2]
rows = []
for path in sorted(glob.glob(os.path.join(out, "plain_r*.json"))):
    r = path.rsplit("_r", 1)[1][:-5]
    plain, spec = (json.load(open(os.path.join(out, f"{n}_r{r}.json")))["summary"] for n in ("plain", "lookahead"))
    rows.append({"round": int(r), "plain_out_tok_s": round(plain["output_throughput"], 1),
                 "lookahead_out_tok_s": round(spec["output_throughput"], 1),
                 "ratio": round(spec["output_throughput"] / plain["output_throughput"], 3),
                 "plain_tpot_p99_ms": round(plain["tpot_ms"]["p99"], 1),
                 "lookahead_tpot_p99_ms": round(spec["tpot_ms"]["p99"], 1)})
summary = {"command": command, "rounds": rows, "median_ratio": statistics.median(r["ratio"] for r in rows)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
