"""Greedy tokens of three fixed prompts, as JSON: `python benchmarks/greedy_tokens.py MODEL > F.json`.

For checking that a change keeps a model's outputs: run it from two checkouts (PYTHONPATH=CHECKOUT) and
compare the files byte for byte.
"""
import json
import sys

from kvloom import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "def add(a, b):"]

if __name__ == "__main__":
    llm = LLM(sys.argv[1] if len(sys.argv) > 1 else None)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    print(json.dumps([o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]))
