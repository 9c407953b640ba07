"""One 48-request burst against a fresh `kvloom serve` (defaults), with how often its threads slept:
`python benchmarks/serving_threads.py OUT.json [--isa avx2] [--sampled] [--models N]`.

Each thread's voluntary context switches over the burst (from /proc) show whether the engine's compute
threads spin at OpenMP barriers (a few hundred) or sleep and wake at each of them (tens of thousands,
kvloom/engine/openmp_pool.py). The serving figures are `kvloom bench serve`'s, whose own JSON is kept
beside OUT. To compare two trees, run this once from each in turn (PYTHONPATH=TREE). --models N serves the
default model under N names, one loaded at a time (`--model mI=PATH ... --max-loaded-models 1`): the burst
goes to the first, which loads on the warm-up request.
"""
import argparse
import json
import os
import subprocess
import sys
import urllib.request

from kvloom.bench.soak_server import ServerProcess
from kvloom.kernels.build import cpu_info
from kvloom.models.model_source import default_model_path

AVX2_CAP = {"KVLOOM_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}


def thread_stats(pid: int) -> dict[int, dict]:
    stats = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = dict(line.split(":\t", 1) for line in f if "\t" in line)
        except OSError:   # the thread ended between the listing and the read
            continue
        stats[int(tid)] = {"cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
                           "voluntary_switches": int(status["voluntary_ctxt_switches"]),
                           "involuntary_switches": int(status["nonvoluntary_ctxt_switches"])}
    return stats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--isa", choices=["native", "avx2"], default="native")
    p.add_argument("--sampled", action="store_true", help="temperature 0.7, top-p 0.95")
    p.add_argument("--models", type=int, default=1, help="names the model is served under (2+: the multi-model server)")
    args = p.parse_args()
    if args.isa == "avx2":
        os.environ.update(AVX2_CAP)   # the server and the benchmark client alike
    model = default_model_path()
    served = [] if args.models == 1 else \
        [a for i in range(args.models) for a in ("--model", f"m{i}={model}")] + ["--max-loaded-models", "1"]
    server = ServerProcess(str(model) if args.models == 1 else None, None, served, log_path=args.out + ".server.log")
    url = server.base_url
    try:
        server.start()
        before = thread_stats(server.pid)
        burst = args.out + ".bench.json"
        cmd = ["kvloom", "bench", "serve", "--base-url", url, "--tokenizer", str(model), "--workload", "poisson",
               "--request-rate", "inf", "--num-requests", "48", "--input-len", "100", "--output-len", "128",
               "--out", burst] + (["--temperature", "0.7", "--top-p", "0.95"] if args.sampled else [])
        with open(args.out + ".bench.log", "w") as client_log:
            subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, stdout=client_log,
                           stderr=subprocess.STDOUT)
        after = thread_stats(server.pid)
        info = json.load(urllib.request.urlopen(url + "/server_info"))
        if args.models > 1:   # the multi-model front: each loaded model's description
            info = info["loaded"]["m0"]
    finally:
        server.stop()
    threads = []
    for tid, end in after.items():
        start = before.get(tid, {"cpu_s": 0.0, "voluntary_switches": 0, "involuntary_switches": 0})
        delta = {k: round(end[k] - start[k], 2) for k in end}
        if delta["cpu_s"] >= 0.5:   # the threads that worked during the burst
            threads.append({"tid": tid, **delta})
    summary = json.load(open(burst))["summary"]
    result = {"command": "python benchmarks/serving_threads.py " + " ".join(sys.argv[1:]),
              "cpu_class": info.get("inference_paths", {}).get("kernels", {}).get("isa"),
              "cpu_isa": cpu_info().isa, "torch_threads": info.get("torch_threads"),
              "output_tok_s": round(summary["output_throughput"], 1),
              "tpot_p99_ms": round(summary["tpot_ms"]["p99"], 1), "ttft_p99_ms": round(summary["ttft_ms"]["p99"]),
              "duration_s": round(summary["duration_s"], 2), "busy_threads": threads}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "busy_threads"}),
          [(t["cpu_s"], t["voluntary_switches"]) for t in threads])


if __name__ == "__main__":
    main()
