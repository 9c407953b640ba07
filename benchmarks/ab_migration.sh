#!/usr/bin/env bash
# Migration stall of two checkouts, alternated in one sitting (old, new, old, new):
#   bash benchmarks/ab_migration.sh OLD_DIR NEW_DIR OUT_DIR [ROUNDS] [CONTEXTS]
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-2} contexts=${5:-512,2048}
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for name in old new; do
    dir=${!name}
    PYTHONPATH=$dir python -m kvloom.cli bench migration --contexts "$contexts" --repeats 2 \
      --out "$out/${name}_$r.json" >"$out/${name}_$r.log" 2>&1
  done
done
