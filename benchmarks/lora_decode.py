"""Decode speed with 0, 1 and 4 distinct LoRA adapters in the batch, at batch 1 and 32, in one sitting.

The adapters are random (rank 16, every projection), written in peft's layout; speed does not depend on
their values. Each configuration generates 64 tokens per request (greedy, past EOS) from short prompts;
rounds alternate the configurations and the median round counts.

    python benchmarks/lora_decode.py --out docs/results/lora/decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from kvloom import LLM, SamplingParams
from kvloom.kernels.build import cpu_info
from kvloom.lora.tables import part_shapes
from kvloom.system_info import stack_description

MODULES = {"q_proj": ("qkv", 0, "self_attn"), "k_proj": ("qkv", 1, "self_attn"), "v_proj": ("qkv", 2, "self_attn"),
           "o_proj": ("o", 0, "self_attn"), "gate_proj": ("gate_up", 0, "mlp"), "up_proj": ("gate_up", 1, "mlp"),
           "down_proj": ("down", 0, "mlp")}


def write_adapter(directory: str, model, rank: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    shapes = part_shapes(model)
    tensors = {}
    for i in range(model.shape.num_layers):
        for name, (fused, part, block) in MODULES.items():
            out, inp = shapes[fused][part]
            prefix = f"base_model.model.model.layers.{i}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}, f)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    probe = LLM(args.model, kv_cache_memory="64MiB")
    model = probe.engine.model
    root = tempfile.mkdtemp()
    adapters = {f"a{k}": write_adapter(os.path.join(root, f"a{k}"), model, 16, k) for k in range(4)}
    del probe
    llm = LLM(args.model, lora_modules=adapters, max_loras=4, max_lora_rank=16)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    configs = [(batch, distinct) for batch in (1, 32) for distinct in (0, 1, 4) if distinct <= batch]
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for batch, distinct in configs:
            prompts = [f"Request {i}: tell me about the number {i}." for i in range(batch)]
            names = [None] * batch if distinct == 0 else [f"a{i % distinct}" for i in range(batch)]
            llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), lora=names[0])   # warm
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, lora=names, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            assert all(len(r.token_ids) == args.tokens for r in out)
            times[(batch, distinct)].append(batch * args.tokens / elapsed)
    rows = [{"batch": b, "distinct_adapters": d, "tok_per_s_median": statistics.median(times[(b, d)]),
             "tok_per_s_rounds": times[(b, d)]} for b, d in configs]
    for r in rows:
        print(f"batch {r['batch']:2d}  adapters {r['distinct_adapters']}  {r['tok_per_s_median']:7.1f} tok/s")
    result = {"command": " ".join(sys.argv), "cpu_class": cpu_info().isa, "stack": stack_description(),
              "quantization": llm.engine.config.quantization, "rank": 16, "tokens": args.tokens, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
