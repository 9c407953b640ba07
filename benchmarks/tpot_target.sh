#!/usr/bin/env bash
# The serving burst with the TPOT target (kvloom serve's default, 100 ms) and without (--tpot-target-ms 0),
# alternating, so each pair ran on the same host minutes apart:
#   bash benchmarks/tpot_target.sh CLASS OUT [PAIRS]     CLASS: native | avx2 (capped as in cpu_class.sh)
# Writes OUT/{on,off}_rN.json (kvloom bench serve) and OUT/cpu_flags.txt.
set -euo pipefail
CLASS=$1 OUT=$2 PAIRS=${3:-2}
GGUF=$(python -c "from kvloom.models.model_source import default_model_path as d; print(d())")
PORT=${PORT:-8137}
mkdir -p "$OUT"
source "$(dirname "$0")/servers.sh"
cap_class "$CLASS" "$OUT"
for r in $(seq "$PAIRS"); do
  for mode in on off; do
    flags=(); [ "$mode" = off ] && flags=(--tpot-target-ms 0)
    KVLOOM_SERVE_FLAGS="${flags[*]}" start_server kvloom "$OUT/server_${mode}_r$r.log"
    kvloom bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$GGUF" "${BURST[@]}" \
        --out "$OUT/${mode}_r$r.json" > "$OUT/${mode}_r$r.log" 2>&1
    kill "$server"; wait "$server" || true
  done
done
python - "$OUT" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "o*_r*.json"))):
    s = json.load(open(path))["summary"]
    print(f"{os.path.basename(path):12s} {s['output_throughput']:7.1f} tok/s  TPOT p50 {s['tpot_ms']['median']:6.1f}"
          f"  p99 {s['tpot_ms']['p99']:6.1f} ms  TTFT p50 {s['ttft_ms']['median']:7.0f} ms")
PY
