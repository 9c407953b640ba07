"""What one core can multiply-accumulate with AVX2, per instruction sequence: `python benchmarks/avx2_mac_ceiling.py OUT.json`.

Compiles benchmarks/avx2_mac_ceiling.cpp with g++ (-O3 -mavx2 -mfma: AVX2 code
on any x86-64 host) and runs it three times; writes GMAC/s per loop and run
with the CPU's class and model. The loops are GEMM inner tiles with operands in L1: the
ceiling each way of computing int8 or float products can reach on this core.
"""
import json
import os
import subprocess
import sys
import tempfile

from kvloom.kernels.build import cpu_info
from kvloom.system_info import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "ceiling")
        subprocess.run(["g++", "-O3", "-mavx2", "-mfma", "-o", binary, os.path.join(HERE, "avx2_mac_ceiling.cpp")],
                       check=True)
        runs = [json.loads(subprocess.run([binary], check=True, capture_output=True, text=True).stdout)
                for _ in range(3)]
    cpu = cpu_info()
    result = {"command": f"python benchmarks/avx2_mac_ceiling.py {out}", "cpu_model": cpu_model(),
              "cpu_class": cpu.isa, "cpu_features": list(cpu.features),
              "unit": "GMAC/s on one core", "runs": runs,
              "best": {k: max(r[k] for r in runs) for k in runs[0]}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps(result["best"]))


if __name__ == "__main__":
    main(sys.argv[1])
