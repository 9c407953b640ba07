"""Where one decode step's time goes: `python benchmarks/profile_step.py [batch] [quantization]`.

Fills a batch with 100-token prompts, runs until every request decodes, then
times steady-state steps and prints torch.profiler's table of the slowest ops.
"""
import sys
import time

from torch.profiler import ProfilerActivity, profile

from kvloom import SamplingParams
from kvloom.corpus import prompts_of_length
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine


def main(batch: int = 32, quantization: str = "none") -> None:
    engine = Engine(EngineConfig(quantization=quantization))
    for p in prompts_of_length(engine.tokenizer, [100] * batch):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_uncomputed > 1 for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(8):
            engine.step()
        best = min(best, (time.perf_counter() - t) / 8)
    print(f"batch {batch}, {quantization}: {best * 1e3:.1f} ms/step, {batch / best:.1f} tok/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32, sys.argv[2] if len(sys.argv) > 2 else "none")
