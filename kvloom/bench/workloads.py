"""Benchmark workloads: what to send and when.

Real traces first (BurstGPT, Azure LLM inference 2023: each row's token
counts become a prompt of that many corpus tokens and max_tokens with
ignore_eos), then synthetic arrivals (Poisson, Gamma), a shared-prefix
workload and a 'repetitive' one whose outputs copy spans of the input.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from kvloom.corpus import corpus_text, corpus_token_ids
from kvloom.tokenizer import Tokenizer

TRACE_FILES = {"burstgpt": "burstgpt_sample.csv", "azure-conv": "azure_conv_sample.csv",
               "azure-code": "azure_code_sample.csv"}
WORKLOADS = [*TRACE_FILES, "poisson", "gamma", "shared-prefix", "repetitive"]


@dataclass
class BenchRequest:
    arrival: float           # seconds after the run starts
    prompt: list[int]        # token ids, exactly input_len of them
    max_tokens: int
    ignore_eos: bool = True


@dataclass
class Workload:
    requests: list[BenchRequest]
    name: str
    clipped: int = 0         # rows shortened to fit the model's context
    description: str = ""


def _seed_start(seed: int, n: int) -> int:
    """Where a seed's prompts start among n places, so runs with different seeds do not replay each other's
    text (and hit each other's cached prefixes). Seed 0 keeps the offsets older results used."""
    return 0 if seed == 0 else int(np.random.default_rng([seed, n]).integers(n))


def find_trace(name_or_path: str) -> str:
    """A trace CSV: a path, or a known name looked up in shared/workloads near the working dir or the repo."""
    if os.path.isfile(name_or_path):
        return name_or_path
    fname = TRACE_FILES.get(name_or_path, name_or_path)
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.getcwd(), os.path.join(here, "..", "..")]
    for root in roots:
        for rel in ("../shared/workloads", "shared/workloads", "workloads"):
            p = os.path.normpath(os.path.join(root, rel, fname))
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"trace {name_or_path!r} not found in ../shared/workloads; pass --trace PATH")


def read_trace(path: str) -> list[tuple[float, int, int]]:
    """(seconds from the first row, request tokens, response tokens) for BurstGPT- or Azure-style CSVs."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if "Timestamp" in row:  # BurstGPT
                t, n_in, n_out = float(row["Timestamp"]), int(row["Request tokens"]), int(row["Response tokens"])
            else:                   # Azure: TIMESTAMP, ContextTokens, GeneratedTokens
                t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
                n_in, n_out = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            if n_out > 0 and n_in > 0:  # failed requests (0 tokens) are not replayed
                rows.append((t, n_in, n_out))
    if not rows:
        raise ValueError(f"no usable rows in {path}")
    t0 = min(r[0] for r in rows)
    return sorted((t - t0, i, o) for t, i, o in rows)


def _corpus_prompt(ids: list[int], n: int, offset: int) -> list[int]:
    """n corpus tokens starting near offset, wrapping around (prompts longer than the corpus repeat it)."""
    out = []
    while len(out) < n:
        start = offset % len(ids)
        out.extend(ids[start:start + n - len(out)])
        offset = 0
    return out


def _clip(n_in: int, n_out: int, max_len: int) -> tuple[int, int, bool]:
    if n_in + n_out <= max_len:
        return n_in, n_out, False
    n_out = min(n_out, max(1, max_len // 4))
    n_in = min(n_in, max_len - n_out)
    return n_in, n_out, True


def trace_workload(tokenizer: Tokenizer, path: str, num_requests: int, time_scale: float, max_len: int,
                   name: str) -> Workload:
    """Replay a trace; time_scale > 1 compresses the gaps (multiplies the request rate)."""
    rows = read_trace(path)[:num_requests]
    ids = corpus_token_ids(tokenizer)
    reqs, clipped = [], 0
    for k, (t, n_in, n_out) in enumerate(rows):
        n_in, n_out, was = _clip(n_in, n_out, max_len)
        clipped += was
        reqs.append(BenchRequest(t / time_scale, _corpus_prompt(ids, n_in, 7919 * k), n_out))
    return Workload(reqs, name, clipped, f"{os.path.basename(path)}, {len(reqs)} rows, time scale {time_scale}")


def arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times: Gamma gaps with shape=burstiness (1 is Poisson; < 1 burstier, CV = 1/sqrt(shape))."""
    if rate == float("inf"):
        return np.zeros(n)
    shape = burstiness
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _lengths(mean: int, range_ratio: float, n: int, rng) -> list[int]:
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def synthetic_workload(tokenizer: Tokenizer, kind: str, num_requests: int, rate: float, burstiness: float,
                       input_len: int, output_len: int, range_ratio: float, max_len: int, seed: int,
                       prefix_len: int = 1000) -> Workload:
    rng = np.random.default_rng(seed)
    times = arrivals(num_requests, rate, burstiness, rng)
    ids = corpus_token_ids(tokenizer)
    ins = _lengths(input_len, range_ratio, num_requests, rng)
    outs = _lengths(output_len, range_ratio, num_requests, rng)
    reqs, clipped = [], 0
    if kind == "repetitive":
        return _repetitive(tokenizer, times, outs, max_len, seed)
    shared = _corpus_prompt(ids, prefix_len, 0) if kind == "shared-prefix" else []
    first = _seed_start(seed, len(ids))
    for k in range(num_requests):
        n_in, n_out, was = _clip(len(shared) + ins[k], outs[k], max_len)
        clipped += was
        own = _corpus_prompt(ids, n_in - len(shared), first + 104729 + 7919 * k) if n_in > len(shared) else []
        reqs.append(BenchRequest(float(times[k]), (shared + own)[:n_in], n_out))
    desc = f"{kind}: rate {rate}/s, burstiness {burstiness}, input ~{input_len}, output ~{output_len}"
    if shared:
        desc += f", shared prefix {prefix_len} tokens"
    return Workload(reqs, kind, clipped, desc)


def _repetitive(tokenizer: Tokenizer, times, outs: list[int], max_len: int, seed: int) -> Workload:
    """Prompts that ask for a passage back verbatim: the answer copies long spans of the input."""
    text = corpus_text()
    paras = [p for p in text.split("\n\n") if 400 < len(p) < 1600]
    first = _seed_start(seed, len(paras))
    reqs = []
    for k, t in enumerate(times):
        para = paras[(first + k * 37) % len(paras)]
        prompt = (f"Copy the following passage exactly, word for word.\n\nPassage:\n{para}\n\nCopy:\n"
                  f"{para[:80]}")
        ids = tokenizer.encode(prompt)[: max_len - outs[k]]
        reqs.append(BenchRequest(float(t), ids, outs[k]))
    return Workload(reqs, "repetitive", 0, "repetitive: passages copied back verbatim")
