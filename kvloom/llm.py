"""The offline API: LLM(model).generate(prompts) and .chat(conversations)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from kvloom.config import EngineConfig, parse_size
from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.sampler import TokenLogprobs
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass
class Completion:
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None


@dataclass
class GenerationResult:
    """All completions of one prompt; .text etc. are the first one's."""

    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs


class LLM:
    """Offline batch generation. `model=None` loads the built-in default (SmolLM2-135M-Instruct, GGUF)."""

    def __init__(self, model: str | None = None, **engine_args):
        if "kv_cache_memory" in engine_args:
            engine_args["kv_cache_memory"] = parse_size(engine_args["kv_cache_memory"])
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = True, session_id: str | None = None) -> list[GenerationResult]:
        """One result per prompt, in order. A single string or token-id list counts as one prompt.

        session_id marks the call as one step of an agent program: its KV is kept for the next call.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given", field="prompts")
        params = sampling_params or SamplingParams()
        return self._run(list(prompts), params, use_tqdm, session_id)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[GenerationResult]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self._run(prompts, sampling_params or SamplingParams(), use_tqdm)

    def close_session(self, session_id: str) -> bool:
        """Release the KV an agent session kept between calls."""
        return self.engine.close_session(session_id)

    def _run(self, prompts: list[Prompt], params: SamplingParams, use_tqdm: bool,
             session_id: str | None = None) -> list[GenerationResult]:
        engine = self.engine
        ids: list[str] = []
        try:
            for i, prompt in enumerate(prompts):
                ids.append(engine.add_request(prompt, params, request_id=f"llm-{id(self)}-{i}",
                                              session_id=session_id))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finals: dict[tuple[str, int], RequestOutput] = {}
        bar = tqdm(total=len(prompts) * params.n, desc="Generating", unit="seq",
                   disable=not (use_tqdm and sys.stderr.isatty()))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finals[(out.parent_id, out.index)] = out
                    bar.update(1)
        bar.close()
        results = []
        for prompt, rid in zip(prompts, ids):
            outs = [finals[(rid, k)] for k in range(params.n)]
            results.append(GenerationResult(prompt, outs[0].prompt_token_ids, [
                Completion(o.text, o.token_ids, o.finish_reason, o.logprobs, o.stop_reason) for o in outs],
                outs[0].num_cached_tokens))
        return results
