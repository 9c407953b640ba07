"""The test suite's int8 KV perplexity check (1,025 tokens, windows of 512, the default model) as one JSON line:
`HF_HUB_OFFLINE=1 [KVLOOM_ISA=avx2] python benchmarks/kv_int8_ppl_by_class.py`. Run once per kernel class to
see how much the float32-KV baseline itself moves between classes (tests/test_kv_int8.py's bound)."""
import json

from kvloom import LLM
from kvloom.eval.perplexity import perplexity
from kvloom.kernels import kernels

r = {kv: perplexity(LLM(kv_cache_dtype=kv, max_model_len=1024).engine, num_tokens=1025, window=512)["perplexity"]
     for kv in ("float32", "int8")}
print(json.dumps({"kernels_isa": kernels().isa(), **r, "delta": r["int8"] / r["float32"] - 1}))
