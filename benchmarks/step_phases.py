"""Where a steady-state decode step's milliseconds go, by module:
`python benchmarks/step_phases.py Q BATCH [modules|stack] [MODEL] [STEPS]` (MODEL: default the built-in, or
`default`; STEPS: default 20).

Wraps the scheduler, the runner's input building, the model and each layer's
parts with timers (sums over the 30 layers), fills a batch of 100-token
prompts, then times STEPS decode steps. The wrappers add a little to each part.
With the native decode stack (the default), decode steps run all layers in one
call, timed as a whole; a third argument `modules` turns the stack off (the
native kernels stay on) to show the module path's parts.
"""
import sys
import time

from kvloom import SamplingParams
from kvloom.corpus import prompts_of_length
from kvloom.config import EngineConfig
from kvloom.engine import model_runner
from kvloom.engine.engine import Engine


def main(quantization: str, batch: int, steps: int = 20, stack: bool = True, model: str | None = None) -> None:
    engine = Engine(EngineConfig(model=model, quantization=quantization, num_threads=2))
    if not stack:
        engine.runner.decode_stack = None
    for p in prompts_of_length(engine.tokenizer, [100] * batch):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_uncomputed > 1 for r in engine.scheduler.requests.values()):
        engine.step()
    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t
            return result
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner._prepare = timed("build inputs", engine.runner._prepare)
    engine.runner.sample = timed("sample", engine.runner.sample)
    engine.runner._drop_non_finite = timed("  non-finite check", engine.runner._drop_non_finite)
    model_runner.sample = timed("  sampler", model_runner.sample)
    rope = engine.model.rope
    for name in ("cos_sin", "rows"):   # the module path's tables, the stack's rows (older trees: cos_sin alone)
        if hasattr(rope, name):
            setattr(rope, name, timed("rope tables", getattr(rope, name)))
    for layer in engine.model.layers:
        attn = layer.self_attn
        attn.forward = timed("attention block", attn.forward)
        attn.qkv_proj.forward = timed("  qkv projection", attn.qkv_proj.forward)
        attn.o_proj.forward = timed("  o projection", attn.o_proj.forward)
        layer.mlp.forward = timed("mlp", layer.mlp.forward)
        layer.input_layernorm.forward = timed("norms", layer.input_layernorm.forward)
        layer.post_attention_layernorm.forward = timed("norms", layer.post_attention_layernorm.forward)
    engine.model.lm_head.forward = timed("lm head", engine.model.lm_head.forward)
    engine.model.embed_tokens.forward = timed("embedding", engine.model.embed_tokens.forward)
    if engine.runner.decode_stack is not None:   # decode-only steps run every layer in one native call
        engine.runner.decode_stack.stack = _TimedStack(engine.runner.decode_stack.stack, timed)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step = (time.perf_counter() - t) / steps
    print(f"{quantization} batch {batch}: {step * 1e3:.2f} ms a step")
    for name, total in totals.items():
        print(f"  {name:30s} {total / steps * 1e3:7.2f} ms")


class _TimedStack:
    def __init__(self, stack, timed):
        self.forward = timed("decoder layers (native stack)", stack.forward)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "w8a8", int(sys.argv[2]) if len(sys.argv) > 2 else 1,
         stack=(sys.argv[3] if len(sys.argv) > 3 else "stack") != "modules",
         model=None if len(sys.argv) <= 4 or sys.argv[4] == "default" else sys.argv[4],
         steps=int(sys.argv[5]) if len(sys.argv) > 5 else 20)
