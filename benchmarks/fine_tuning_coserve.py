"""Fine-tuning while serving, measured on a real `kvloom serve --enable-fine-tuning` (the default model).

Three kinds of window, alternated in one sitting so the VM's drift hits them alike:
  serve  - a Poisson serving load alone (100-token prompts, 64 output tokens, greedy, streamed);
  train  - a fine-tuning job alone;
  both   - the same load while a job trains.
Each serving window reports output tok/s and TPOT/TTFT percentiles; each training window the job's trained
tokens per second (from the job's `kvloom.progress`, sampled at the window's start and end). A fresh job is
made for every training window and cancelled after it.

Then the proof of learning: one job trains to the end on a task with a fixed answer format (generated below),
and greedy answers to held-out questions are checked for that format, from the base model and the adapter.

    python benchmarks/fine_tuning_coserve.py --out docs/results/fine_tuning/coserve.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai

from kvloom.bench.client import run_requests, warm_up
from kvloom.bench.metrics import summarize
from kvloom.bench.serve import load_tokenizer
from kvloom.bench.workloads import synthetic_workload
from kvloom.kernels.build import cpu_info
from kvloom.system_info import stack_description

HEADER = "### Answer"
FOOTER = "[done]"


def format_task(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[str]]:
    """Questions with exact short answers, answered in a fixed format the base model never uses:
    '### Answer\\n<answer>\\n[done]'. Test questions use numbers and words the training set does not."""
    rng = random.Random(seed)
    words = ["apple", "river", "cloud", "stone", "tiger", "violin", "garden", "pencil", "rocket", "lantern",
             "meadow", "harbor", "candle", "forest", "island", "mirror"]

    def question(k: int, pool: list[str], lo: int, hi: int) -> tuple[str, str]:
        kind = k % 4
        if kind == 0:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            return f"What is {a} plus {b}?", str(a + b)
        if kind == 1:
            w = rng.choice(pool)
            return f"Spell the word '{w}' backwards.", w[::-1]
        if kind == 2:
            w = rng.choice(pool)
            return f"How many letters are in the word '{w}'?", str(len(w))
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"Which is larger, {a} or {b}?", str(max(a, b))

    train = []
    for k in range(n_train):
        q, a = question(k, words[:10], 2, 40)
        train.append({"messages": [{"role": "user", "content": q},
                                   {"role": "assistant", "content": f"{HEADER}\n{a}\n{FOOTER}"}]})
    test = [question(k, words[10:], 41, 90)[0] for k in range(n_test)]
    return train, test


def follows_format(text: str) -> bool:
    return text.lstrip().startswith(HEADER) and FOOTER in text


def start_server(port: int, out_dir: str, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvloom.cli", "serve", "--port", str(port), "--enable-fine-tuning",
           "--fine-tuning-dir", out_dir]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        time.sleep(1)
    raise RuntimeError("server did not start")


def progress(client, job_id: str) -> tuple[float, float]:
    job = client.fine_tuning.jobs.retrieve(job_id)
    p = job.model_extra["kvloom"]["progress"]
    return p["trained_tokens"], p["train_seconds"]


def start_job(client, model: str, file_id: str) -> str:
    job = client.fine_tuning.jobs.create(model=model, training_file=file_id, hyperparameters={"n_epochs": 50})
    while client.fine_tuning.jobs.retrieve(job.id).status != "running":
        time.sleep(0.2)
    while progress(client, job.id)[0] == 0:     # its first example has passed (the float copy is loaded)
        time.sleep(0.2)
    return job.id


def learning_run(client, model: str, file_id: str, train: list, test: list, epochs: int) -> dict:
    """One job to the end, alone; then held-out answers from the base model and the adapter."""
    t0 = time.perf_counter()
    job = client.fine_tuning.jobs.create(model=model, training_file=file_id, suffix="format",
                                         hyperparameters={"n_epochs": epochs, "batch_size": 4})
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status in ("queued", "running"):
        time.sleep(1)
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
    learn = {"status": job.status, "error": job.error and job.error.model_dump(), "seconds": time.perf_counter() - t0,
             "trained_tokens": job.trained_tokens, "fine_tuned_model": job.fine_tuned_model,
             "train_examples": len(train), "epochs": epochs, "losses": losses}
    if job.status == "succeeded":
        for name, served in (("base", model), ("adapter", job.fine_tuned_model)):
            answers = [client.chat.completions.create(model=served, messages=[{"role": "user", "content": q}],
                                                      max_tokens=24, temperature=0).choices[0].message.content
                       for q in test]
            learn[name] = {"follows_format": sum(map(follows_format, answers)), "of": len(test),
                           "examples": answers[:4]}
    return learn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--window", type=float, default=40.0, help="seconds per measured window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2.0, help="serving load, requests per second")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the learning run")
    ap.add_argument("--skip-learning", action="store_true", help="only the co-serving windows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    base_url = f"http://127.0.0.1:{args.port}"
    work = tempfile.mkdtemp(prefix="kvloom-ft-bench-")
    proc = start_server(args.port, work, os.path.join(work, "server.log"))
    result = {"command": "python benchmarks/fine_tuning_coserve.py " + " ".join(sys.argv[1:]),
              "cpu_class": cpu_info().isa, "stack": stack_description(), "window_s": args.window,
              "load": f"Poisson {args.rate} req/s, 100 in / 64 out, greedy", "windows": []}
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        train, test = format_task(0, 64, 40)
        upload = client.files.create(file=("format.jsonl", "\n".join(json.dumps(t) for t in train).encode()),
                                     purpose="fine-tune")
        tok = load_tokenizer(None)
        workload = synthetic_workload(tok, "random", int(args.rate * args.window * 2), args.rate, 1.0, 100, 64,
                                      0.0, 2048, seed=1)
        asyncio.run(warm_up(base_url, model, workload.requests[0]))

        def serve_window():
            records, duration = asyncio.run(run_requests(base_url, model, workload.requests, args.window,
                                                         progress=False))
            done = [r for r in records if r.success]
            return summarize(done, duration) | {"cut_at_window_end": len(records) - len(done)}

        for rnd in range(args.rounds):
            for kind in (["serve", "both", "train"] if rnd % 2 == 0 else ["train", "both", "serve"]):
                entry = {"round": rnd + 1, "kind": kind}
                job = start_job(client, model, upload.id) if kind != "serve" else None
                if job is not None:
                    tokens0, secs0 = progress(client, job)
                t0 = time.perf_counter()
                if kind == "train":
                    time.sleep(args.window)
                else:
                    entry["serving"] = serve_window()
                if job is not None:
                    tokens1, secs1 = progress(client, job)
                    wall = time.perf_counter() - t0
                    entry["training"] = {"trained_tokens": tokens1 - tokens0, "wall_s": wall,
                                         "tokens_per_s": (tokens1 - tokens0) / wall,
                                         "share_of_wall_in_training": (secs1 - secs0) / wall}
                    client.fine_tuning.jobs.cancel(job)
                result["windows"].append(entry)
                print(json.dumps(entry), flush=True)

        if not args.skip_learning:
            result["learning"] = learning_run(client, model, upload.id, train, test, args.epochs)
            print(json.dumps(result["learning"])[:2000], flush=True)
    finally:
        proc.terminate()
        proc.wait(60)

    def med(kind, path):
        vals = []
        for w in result["windows"]:
            if w["kind"] == kind:
                v = w
                for k in path:
                    v = v[k]
                vals.append(v)
        return statistics.median(vals) if vals else None
    result["summary"] = {
        "serve_alone_output_tok_s": med("serve", ["serving", "output_throughput"]),
        "serve_with_job_output_tok_s": med("both", ["serving", "output_throughput"]),
        "tpot_p99_ms_alone": med("serve", ["serving", "tpot_ms", "p99"]),
        "tpot_p99_ms_with_job": med("both", ["serving", "tpot_ms", "p99"]),
        "tpot_median_ms_alone": med("serve", ["serving", "tpot_ms", "median"]),
        "tpot_median_ms_with_job": med("both", ["serving", "tpot_ms", "median"]),
        "train_tok_s_alone": med("train", ["training", "tokens_per_s"]),
        "train_tok_s_coserved": med("both", ["training", "tokens_per_s"]),
    }
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
