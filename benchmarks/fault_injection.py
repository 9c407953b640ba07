"""Inject each fault into a live `kvloom serve` (KVLOOM_INJECT_FAULTS) and record what its clients saw.

Per fault kind a fresh server (the default model unless --model) runs with --max-num-seqs 4 and gets 8
concurrent greedy requests, half streamed: the 4 running in the faulty step should end with a 500 or an SSE
error event, the 4 queued ones finish with exactly the tokens of a run without faults. Then 8 more requests
check the server serves on, and /metrics that no request runs and no KV block is held. `loop` kills the
engine thread instead: every client must get an error (none hangs) and /health must turn 503.

    python benchmarks/fault_injection.py --out docs/results/reliability/faults.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvloom.kernels.build import cpu_info
from kvloom.system_info import stack_description

KINDS = {"runner": "runner@12", "sampler": "sampler@12", "detokenizer": "detokenizer@12", "nan": "nan@12",
         "loop": "loop@12"}
PROMPTS = [f"Write a short note number {i} about the sea, the wind and the boats." for i in range(8)]
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: list[str], faults: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("KVLOOM_INJECT_FAULTS", None)
    if faults:
        env["KVLOOM_INJECT_FAULTS"] = faults
    proc = subprocess.Popen([sys.executable, "-m", "kvloom.cli", "serve", *model, "--port", str(port),
                             "--max-num-seqs", "4", "--served-model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited at start")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up")


async def one(h: httpx.AsyncClient, i: int, stream: bool) -> dict:
    body = {"model": "m", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    try:
        if not stream:
            r = await h.post("/v1/completions", json=body)
            if r.status_code != 200:
                return {"status": r.status_code, "error": r.json()["error"]["message"][:120]}
            return {"status": 200, "text": r.json()["choices"][0]["text"]}
        text, error = "", None
        async with h.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "error": (await r.aread()).decode()[:120]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"][:120]
                else:
                    text += event["choices"][0]["text"]
        return {"status": 200, "text": text} if error is None else {"status": 200, "error_event": error}
    except httpx.HTTPError as e:
        return {"status": None, "transport_error": repr(e)}


async def wave(url: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as h:
        return await asyncio.gather(*(one(h, i, stream=i % 2 == 1) for i in range(len(PROMPTS))))


def idle_state(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    g = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return {k: g.get(k) for k in ("kvloom_num_requests_running", "kvloom_num_requests_waiting",
                                  "kvloom_kv_cache_blocks_used")}


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def run(model: list[str]) -> dict:
    proc, url = start(model, None)
    reference = [r["text"] for r in asyncio.run(wave(url))]
    stop(proc)
    results = {}
    for kind, spec in KINDS.items():
        proc, url = start(model, spec)
        first = asyncio.run(wave(url))
        failed = [r for r in first if "text" not in r]
        same = [r["text"] == reference[i] for i, r in enumerate(first) if "text" in r]
        entry = {"spec": spec, "requests": len(first), "failed": len(failed),
                 "failed_as": sorted({f"{r['status']} event" if "error_event" in r else str(r["status"])
                                      for r in failed}),
                 "transport_errors": sum("transport_error" in r for r in first),
                 "finished": len(same), "finished_with_reference_tokens": sum(same)}
        if kind == "loop":
            entry["health_after"] = httpx.get(url + "/health", timeout=10).status_code
            entry["new_request_after"] = httpx.post(url + "/v1/completions", timeout=10,
                                                    json={"model": "m", "prompt": "hi", "max_tokens": 2}).status_code
        else:
            after = asyncio.run(wave(url))
            entry["after"] = {"requests": len(after), "finished_with_reference_tokens":
                              sum(r.get("text") == reference[i] for i, r in enumerate(after))}
            time.sleep(1.0)
            entry["idle"] = idle_state(url)
            entry["health_after"] = httpx.get(url + "/health", timeout=10).status_code
        entry["exit_code"] = stop(proc)
        results[kind] = entry
        print(kind, json.dumps(entry), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model path (default: the built-in model)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"command": " ".join(sys.argv), "cpu_class": cpu_info().isa, "stack": stack_description(),
              "faults": run([args.model] if args.model else [])}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
