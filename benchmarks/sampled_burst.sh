#!/usr/bin/env bash
# kvloom serving the 48-request burst greedy and sampled (temperature 0.7, top-p 0.95), alternating, each run
# on a freshly started server from this tree (benchmarks/cpu_class.sh's burst):
#   bash benchmarks/sampled_burst.sh OUT [ROUNDS] [CLASS]
# CLASS avx2 caps kernels, PyTorch and oneDNN at AVX2 as cpu_class.sh does. Summary: OUT/summary.json.
set -euo pipefail
OUT=$(realpath -m "$1") ROUNDS=${2:-2} CLASS=${3:-native}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GGUF=$(cd "$HERE" && python -c "from kvloom.models.model_source import default_model_path as d; print(d())")
PORT=${PORT:-8137}
mkdir -p "$OUT"
source "$HERE/benchmarks/servers.sh"   # wait_for, cap_class, BURST
cap_class "$CLASS" "$OUT"
export PYTHONPATH="$HERE"
for r in $(seq "$ROUNDS"); do for mode in greedy sampled; do
  python -m kvloom.cli serve "$GGUF" --port "$PORT" > "$OUT/server_${mode}_r$r.log" 2>&1 &
  server=$!
  wait_for "http://127.0.0.1:$PORT/health"
  extra=()
  if [ "$mode" = sampled ]; then extra=(--temperature 0.7 --top-p 0.95); fi
  python -m kvloom.cli bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$GGUF" "${BURST[@]}" "${extra[@]}" \
      --out "$OUT/${mode}_r$r.json" > "$OUT/${mode}_r$r.log" 2>&1
  kill "$server"; wait "$server" || true
done; done
python - "$OUT" "bash benchmarks/sampled_burst.sh $*" <<'PY'
import glob, json, os, sys
out, command = sys.argv[1], sys.argv[2]
rounds = []
for path in sorted(glob.glob(os.path.join(out, "greedy_r*.json"))):
    r = path.rsplit("_r", 1)[1][:-5]
    g, s = (json.load(open(os.path.join(out, f"{m}_r{r}.json")))["summary"] for m in ("greedy", "sampled"))
    rounds.append({"round": int(r), "greedy_out_tok_s": round(g["output_throughput"], 1),
                   "greedy_tpot_p99_ms": round(g["tpot_ms"]["p99"]), "sampled_out_tok_s": round(s["output_throughput"], 1),
                   "sampled_tpot_p99_ms": round(s["tpot_ms"]["p99"]),
                   "sampled_over_greedy": round(s["output_throughput"] / g["output_throughput"], 2),
                   "failed": g["failed"] + s["failed"]})
from kvloom.kernels import kernels_status
summary = {"command": command, "cpu_class": kernels_status()["isa"],
           "load_average_at_end": os.getloadavg(), "rounds": rounds}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
