"""A 512-token prefill's time in one weight mode: `python benchmarks/prefill_ms.py MODE`.

Serves seven different 512-token prompts one at a time (prefix caching off, so
nothing is reused) and prints the median of the last five prefills in ms. Run
two modes or two trees as alternating whole processes to compare them in one
sitting (docs/results/w8a8_avx2_sign/ has such runs).
"""
import statistics
import sys
import time

from kvloom import SamplingParams
from kvloom.config import EngineConfig
from kvloom.corpus import prompts_of_length
from kvloom.engine.engine import Engine


def main(quantization: str) -> None:
    engine = Engine(EngineConfig(quantization=quantization, enable_prefix_caching=False))
    times = []
    for i, prompt in enumerate(prompts_of_length(engine.tokenizer, [512] * 7)):
        start = time.perf_counter()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while engine.scheduler.requests:
            engine.step()
        if i >= 2:   # the first two warm the kernels and the allocator
            times.append(time.perf_counter() - start)
    print(quantization, "prefill512_ms", round(statistics.median(times) * 1e3, 1))


if __name__ == "__main__":
    main(sys.argv[1])
