#!/usr/bin/env bash
# The 48-request burst with the start-up heap frozen out of full garbage collections (kvloom/server/heap.py,
# what `kvloom serve` does) and without (the freeze replaced by a no-op), alternating, greedy and sampled
# (temperature 0.7, top-p 0.95), a fresh server per run:
#   bash benchmarks/gc_freeze_burst.sh OUT [ROUNDS] [CLASS]
# CLASS avx2 caps kernels, PyTorch and oneDNN at AVX2 as cpu_class.sh does. Each server logs the duration of
# every collection it runs (OUT/gc_*.jsonl). Summary: OUT/summary.json.
set -euo pipefail
OUT=$(realpath -m "$1") ROUNDS=${2:-3} CLASS=${3:-native}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GGUF=$(cd "$HERE" && python -c "from kvloom.models.model_source import default_model_path as d; print(d())")
PORT=${PORT:-8137}
mkdir -p "$OUT"
source "$HERE/benchmarks/servers.sh"   # wait_for, cap_class, BURST
cap_class "$CLASS" "$OUT"
export PYTHONPATH="$HERE"
serve() {  # $1: frozen | unfrozen, $2: the collections' log
  exec python - "$1" "$2" "$GGUF" "$PORT" <<'PY'
import gc, json, sys, time
heap, log_path, gguf, port = sys.argv[1:]
log, started = open(log_path, "w"), {}
def timed(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        log.write(json.dumps({"time": time.time(), "generation": info["generation"],
                              "ms": (time.perf_counter() - started["t"]) * 1e3}) + "\n")
        log.flush()
gc.callbacks.append(timed)
import kvloom.server.launch as launch
if heap == "unfrozen":
    launch.freeze_startup_heap = lambda: 0
from kvloom.cli import main
sys.argv = ["kvloom", "serve", gguf, "--port", port]
main()
PY
}
for r in $(seq "$ROUNDS"); do for mode in greedy sampled; do for heap in unfrozen frozen; do
  run="${mode}_${heap}_r$r"
  serve "$heap" "$OUT/gc_$run.jsonl" > "$OUT/server_$run.log" 2>&1 &
  server=$!
  wait_for "http://127.0.0.1:$PORT/health"
  date +%s.%N > "$OUT/start_$run"
  extra=()
  if [ "$mode" = sampled ]; then extra=(--temperature 0.7 --top-p 0.95); fi
  python -m kvloom.cli bench serve --base-url "http://127.0.0.1:$PORT" --tokenizer "$GGUF" "${BURST[@]}" "${extra[@]}" \
      --out "$OUT/$run.json" > "$OUT/$run.log" 2>&1
  kill "$server"; wait "$server" || true
done; done; done
python - "$OUT" "bash benchmarks/gc_freeze_burst.sh $*" <<'PY'
import glob, json, os, statistics, sys
out, command = sys.argv[1], sys.argv[2]
runs = []
for path in sorted(glob.glob(os.path.join(out, "*_r*.json"))):
    run = os.path.basename(path)[:-5]
    mode, heap, r = run.split("_")
    s = json.load(open(path))["summary"]
    start = float(open(os.path.join(out, f"start_{run}")).read())
    full = [c["ms"] for c in map(json.loads, open(os.path.join(out, f"gc_{run}.jsonl")))
            if c["time"] >= start and c["generation"] == 2]
    runs.append({"mode": mode, "heap": heap, "round": int(r[1:]), "out_tok_s": round(s["output_throughput"], 1),
                 "tpot_p99_ms": round(s["tpot_ms"]["p99"]), "ttft_mean_ms": round(s["ttft_ms"]["mean"]),
                 "full_collections_ms": [round(ms, 1) for ms in full], "failed": s["failed"]})
pairs = {}
for m in ("greedy", "sampled"):
    by = {(x["heap"], x["round"]): x for x in runs if x["mode"] == m}
    ratios = [by["frozen", r]["out_tok_s"] / by["unfrozen", r]["out_tok_s"]
              for r in sorted({x["round"] for x in runs}) if ("frozen", r) in by and ("unfrozen", r) in by]
    pairs[m] = {"frozen_over_unfrozen": [round(x, 3) for x in ratios],
                "median": round(statistics.median(ratios), 3) if ratios else None}
for r in sorted({x["round"] for x in runs}):
    by = {(x["mode"], x["heap"]): x for x in runs if x["round"] == r}
    for heap in ("unfrozen", "frozen"):
        if ("greedy", heap) in by and ("sampled", heap) in by:
            pairs.setdefault(f"sampled_over_greedy_{heap}", []).append(
                round(by["sampled", heap]["out_tok_s"] / by["greedy", heap]["out_tok_s"], 3))
from kvloom.kernels import kernels_status
summary = {"command": command, "cpu_class": kernels_status()["isa"], "load_average_at_end": os.getloadavg(),
           "pairs": pairs, "runs": runs}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(summary["pairs"], indent=1))
PY
