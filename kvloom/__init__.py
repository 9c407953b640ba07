"""kvloom: an LLM inference serving engine."""
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.llm import LLM, Completion, GenerationResult
from kvloom.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "Engine", "EngineConfig", "RequestOutput", "Completion",
           "GenerationResult", "__version__"]
