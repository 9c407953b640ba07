"""The sampler's step alone, the torch path against the native one: `python benchmarks/sampler_step.py OUT.json`.

One process, the two paths alternating (old, new, old, new, ...), 48 and 64 rows of a 49,152-token vocabulary,
each row its own seeded request at temperature 0.7 / top-p 0.95 (and a top-k 50 variant), and greedy rows
(torch's argmax against the kernels'). Two kinds of logits:
"peaked" (a row's likeliest ~20 tokens stand 5-14 above a normal background: nuclei of a few to tens of
tokens, as the default model's are) and "flat" (a normal background with smaller bumps: nuclei of hundreds to
thousands, where the torch path falls through to its 4096 and full-vocabulary stages). Medians of the rounds;
the ratio is old / new over the same rounds.
"""
import json
import statistics
import sys
import time

import torch

from kvloom.engine.request import Request
from kvloom.engine.sampler import sample
from kvloom.kernels import kernels
from kvloom.sampling_params import SamplingParams
from kvloom.system_info import save_kernel_result

VOCAB = 49_152


def logits(rows: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * 2.0
    for r in range(rows):
        top = torch.randperm(VOCAB, generator=g)[:20]
        if kind == "peaked":
            x[r, top] += 14.0 - torch.rand(20, generator=g).sort(descending=True).values * 9.0
        else:
            x[r, top] += torch.rand(20, generator=g) * 6.0
    return x


def nucleus_sizes(x: torch.Tensor, top_p: float = 0.95, temperature: float = 0.7) -> list[int]:
    p = torch.softmax(x / temperature, -1).sort(-1, descending=True).values
    return ((p.cumsum(-1) - p) < top_p).sum(-1).tolist()


def time_paths(x: torch.Tensor, settings: dict, rounds: int) -> dict:
    def requests():
        return [Request(f"r{i}", [1], SamplingParams(seed=i, **settings), 8, 0.0, torch.Generator().manual_seed(i))
                for i in range(len(x))]
    times = {False: [], True: []}
    tokens = {}
    for native in (False, True):   # warm-up, and the two paths' tokens (equal: one seed, one token)
        tokens[native] = sample(x, requests(), native=native).token_ids
    for _ in range(rounds):
        for native in (False, True):
            reqs = requests()
            t = time.perf_counter()
            sample(x, reqs, native=native)
            times[native].append(time.perf_counter() - t)
    old, new = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
    ratios = [a / b for a, b in zip(times[False], times[True])]
    return {"torch_ms": round(old, 3), "native_ms": round(new, 3), "ratio_median": round(statistics.median(ratios), 2),
            "same_tokens": tokens[False] == tokens[True]}


def main(out: str, rounds: int = 30) -> None:
    assert kernels() is not None, "needs the native kernels"
    results = []
    for rows in (48, 64):
        for kind in ("peaked", "flat"):
            x = logits(rows, kind)
            sizes = nucleus_sizes(x)
            for settings in (dict(temperature=0.7, top_p=0.95), dict(temperature=0.7, top_p=0.95, top_k=50),
                             dict(temperature=0.0)):
                r = {"rows": rows, "vocab": VOCAB, "logits": kind, "settings": settings,
                     "nucleus_min_median_max": [min(sizes), int(statistics.median(sizes)), max(sizes)],
                     **time_paths(x, settings, rounds)}
                print(json.dumps(r), flush=True)
                results.append(r)
    save_kernel_result(out, "benchmarks/sampler_step.py", results, rounds=rounds)


if __name__ == "__main__":
    main(sys.argv[1])
