import time
from kvloom import SamplingParams
from kvloom.corpus import prompts_of_length
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
e = Engine(EngineConfig(quantization="gguf", num_threads=2))
t0=time.time()
while time.time()-t0 < 40:
    e.add_request(prompts_of_length(e.tokenizer, [100])[0], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    while e.has_unfinished(): e.step()
