"""Start-up time and memory of an engine on a model, each load in a fresh process.

    python benchmarks/load_memory.py --model M [--model M2] [--before DIR] --runs 3 --out F.json

For each model it builds `Engine(EngineConfig(model=M, num_threads=2))` (the defaults, as `kvloom serve M`
would) in a new Python process and records the seconds to build it, the peak resident memory during the
load (VmHWM) and the resident memory after it (VmRSS; the KV pool counts only where written). Each code
checkout loads once unrecorded first (a first load may build its kernels). With --before DIR (a checkout
of older code, e.g. `git worktree add DIR COMMIT`), the older code's loads alternate with this checkout's,
pair by pair, so the host's drift falls on both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, time
started = time.perf_counter()
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.kernels import kernels_status
imported = time.perf_counter()
engine = Engine(EngineConfig(model=sys.argv[1] or None, num_threads=2))
built = time.perf_counter()
status = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "VmRSS"))}
print(json.dumps({"import_s": imported - started, "engine_s": built - imported, "peak_mb": status["VmHWM"] / 1e3,
                  "rss_mb": status["VmRSS"] / 1e3,
                  "quantization": engine.config.quantization, "cpu_class": kernels_status().get("isa")}))
"""


def load_once(model: str, code_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_dir), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, model], env=env, capture_output=True, text=True,
                         check=True, cwd=code_dir)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="model path (repeat); default: the built-in")
    ap.add_argument("--before", type=Path, help="a checkout of older code to alternate with")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    codes = {"after": here, **({"before": args.before.resolve()} if args.before else {})}
    results = []
    for code_dir in codes.values():
        load_once((args.model or [""])[0], code_dir)   # warm-up: kernel builds, file caches
    for model in args.model or [""]:
        for run in range(args.runs):
            order = list(codes.items()) if run % 2 == 0 else list(reversed(codes.items()))
            for label, code_dir in order:
                row = {"model": model or "default", "code": label, "run": run, **load_once(model, code_dir)}
                print(json.dumps(row), flush=True)
                results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results}, indent=1))


if __name__ == "__main__":
    main()
