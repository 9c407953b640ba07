#!/usr/bin/env bash
# The 4-bit product over uncached weights (benchmarks/q4_cold_weights.py), this tree against another
# checkout, alternating, one and two threads:
#   bash benchmarks/q4_cold_pairs.sh BASE_TREE OUT [ROUNDS]
# Writes OUT/{this,base}_t{1,2}_rR.json and OUT/summary.json (per row count, the per-round ratios base / this
# of the best time a call, and their median).
set -euo pipefail
BASE=$(realpath "$1") OUT=$(realpath -m "$2") ROUNDS=${3:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
for r in $(seq "$ROUNDS"); do for t in 1 2; do
  for tree in this base; do
    dir=$HERE; [ "$tree" = base ] && dir=$BASE
    (cd "$dir" && KVLOOM_THREADS=$t PYTHONPATH="$dir" python "$HERE/benchmarks/q4_cold_weights.py" \
        "$OUT/${tree}_t${t}_r$r.json" > "$OUT/${tree}_t${t}_r$r.log" 2>&1)
  done
done; done
python - "$OUT" "bash benchmarks/q4_cold_pairs.sh $*" <<'PY'
import glob, json, os, statistics, sys
out, command = sys.argv[1], sys.argv[2]
summary = {"command": command, "threads": {}}
for t in (1, 2):
    per_rows = {}
    for path in sorted(glob.glob(os.path.join(out, f"this_t{t}_r*.json"))):
        this = json.load(open(path))
        base = json.load(open(path.replace("this_", "base_")))
        summary["cpu_class"] = this["cpu_class"]
        for a, b in zip(this["results"], base["results"]):
            per_rows.setdefault(a["rows"], []).append(
                {"this_us": a["best_us"], "base_us": b["best_us"], "base_over_this": round(b["best_us"] / a["best_us"], 2)})
    summary["threads"][t] = {rows: {"rounds": v, "median_base_over_this": statistics.median(x["base_over_this"] for x in v)}
                             for rows, v in per_rows.items()}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for t, rows in summary["threads"].items():
    print(f"{t} thread(s):", {r: v["median_base_over_this"] for r, v in rows.items()})
PY
