"""python -m kvloom.kernels build | check | status

build   compile the native kernels for this CPU (or KVLOOM_ISA / --isa) into the cache; exit 1 on a compile error
check   load them and run one kernel against PyTorch; exit 1 if they cannot load (what CI runs before the tests)
status  print kernels_status() as JSON, building nothing
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvloom.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["build", "check", "status"])
    p.add_argument("--isa", default=None, help="native | avx512_vnni | avx512 | avx2 | baseline (sets KVLOOM_ISA)")
    args = p.parse_args(argv)
    if args.isa:
        os.environ["KVLOOM_ISA"] = args.isa
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from kvloom.kernels import KernelBuildError, kernels, kernels_disabled_by_env, kernels_status

    if args.command == "status":
        print(json.dumps(kernels_status(), indent=2))
        return 0
    if kernels_disabled_by_env():
        print(f"kvloom.kernels: native kernels turned off (KVLOOM_NO_KERNELS=1): nothing to {args.command}")
        return 0
    t0 = time.monotonic()
    try:
        module = kernels()
        if args.command == "check":
            import torch
            x, w = torch.randn(3, 64), torch.randn(64)
            if not torch.allclose(module.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (64,), w, 1e-5),
                                  atol=1e-5):
                print("kvloom.kernels: check FAILED: rms_norm disagrees with PyTorch", file=sys.stderr)
                return 1
    except KernelBuildError as e:
        print(f"kvloom.kernels: {args.command} FAILED: {e}", file=sys.stderr)
        return 1
    s = kernels_status()
    extra = f", with {' '.join(s['cpu_features'])}" if s["cpu_features"] else ""
    what = "built" if args.command == "build" else "checked"
    print(f"kvloom.kernels: {what} native kernels for {s['isa']} (KVLOOM_ISA={s['isa_request']}; "
          f"CPU class {s['cpu_isa']}{extra}) in {time.monotonic() - t0:.1f} s: {s['build_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
