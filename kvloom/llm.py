"""The offline API: LLM(model).generate(prompts) and .chat(conversations)."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from kvloom.config import EngineConfig, parse_size
from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.engine.sampler import TokenLogprobs
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.beam import BeamProgram
from kvloom.scaling.guided import EngineScorer, ParticleProgram, ParticleSearch
from kvloom.scaling.offline import generate_scaled
from kvloom.scaling.search import SearchResult, run_searches
from kvloom.scaling.spec import ScalingSpec

Prompt = str | list[int]


@dataclass
class Completion:
    """One sampled continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None
    tool_calls: list[dict] | None = None   # LLM.chat(tools=...): the calls parsed from text (OpenAI's shape)
    error: str | None = None               # finish_reason "error": why the engine ended it


@dataclass
class GenerationResult:
    """All completions of one prompt; .text etc. are the first one's."""

    prompt: Prompt
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache
    kvloom: dict | None = None      # best_of / vote / adaptive: the strategy's report (scaling/strategy.py)

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
        """engine_args: EngineConfig's fields; lora_modules may also be a dict {name: peft adapter dir}."""
        if "kv_cache_memory" in engine_args:
            engine_args["kv_cache_memory"] = parse_size(engine_args["kv_cache_memory"])
        if isinstance(engine_args.get("lora_modules"), dict):
            engine_args["lora_modules"] = tuple(engine_args["lora_modules"].items())
        self.engine = Engine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, session_id: str | None = None,
                 lora: str | list[str | None] | None = None, *, best_of: int | None = None,
                 vote: dict | None = None, adaptive: dict | None = None,
                 scorer: str | Callable | None = None, use_beam_search: bool = False, beam_width: int = 4,
                 length_penalty: float = 1.0, guided: dict | None = None) -> list[GenerationResult]:
        """One result per prompt, in order. A single string or token-id list counts as one prompt.
        sampling_params: one for all prompts, or a list with one per prompt.

        session_id marks the call as one step of an agent program: its KV is kept for the next call.
        lora: a loaded adapter's name for every prompt, or one name (or None: the base model) per prompt.

        Inference-time scaling (kvloom/scaling; the samples of a query share its prompt's KV): best_of=N
        returns the best n of N samples by cumulative logprob, or by scorer ("mean_logprob", or a callable
        (prompt, text) -> float); vote={"extract": regex, "n": N} returns the majority answer's first sample;
        adaptive={"max_n": N, "confidence": p, "round": k, "extract": regex} draws rounds of k samples until
        the leading answer's posterior reaches p. Each result's .kvloom reports votes, scores, samples used.
        use_beam_search: the best n of beam_width beams (transformers' beam search, length_penalty as there).
        guided={"particles": K, "step_tokens": T, "temperature": t, "seed": s} with scorer=callable(prompt,
        partial text) -> float (or an EngineScorer such as scaling/process_reward.ProcessReward, whose grading
        requests run in the engine): particle filtering, K particles resampled every T tokens by
        exp(score / t); the best n finished particles are returned (kvloom/scaling/guided.py).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given", field="prompts")
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        # (guided search's scorer is its own: best_of's ranking never sees it)
        spec = ScalingSpec.from_fields(per_prompt[0].n, best_of, vote, adaptive,
                                       None if guided is not None else scorer)
        if guided is not None:
            if (not (callable(scorer) or isinstance(scorer, EngineScorer)) or spec is not None or use_beam_search
                    or isinstance(params, (list, tuple))):
                raise InvalidRequestError("guided search takes a callable scorer (or an EngineScorer), one sampling "
                                          "params, and no best_of / vote / adaptive / beam search", field="guided")
            return self._run_guided(list(prompts), per_prompt[0], scorer, guided)
        if use_beam_search:
            if spec is not None or isinstance(params, (list, tuple)):
                raise InvalidRequestError("beam search takes one sampling params and no best_of / vote / adaptive",
                                          field="use_beam_search")
            return self._run_beams(list(prompts), per_prompt[0], beam_width, length_penalty)
        if spec is not None:
            return self._run_scaled(list(prompts), per_prompt, spec, session_id, lora)
        return self._run(list(prompts), params, use_tqdm, session_id, lora)

    def load_lora(self, name: str, path: str) -> None:
        """Serve a peft adapter directory under `name` from now on."""
        self.engine.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, tool_call_parser: str | None = None) -> list[GenerationResult]:
        """Applies the model's chat template to one conversation or a list of them.

        tools (OpenAI's shape) are rendered by the template (or, for a template that renders none, by the
        parser for the model's family); each completion's tool_calls holds the calls parsed from its text.
        tool_choice "required" or {"type": "function", "function": {"name": ...}} forces a valid call."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = sampling_params or SamplingParams()
        if not tools:
            prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in conversations]
            return self._run(prompts, params, use_tqdm)
        from kvloom.structured.chat_output import ChoiceOutput
        from kvloom.structured.tool_parsers import parser_for
        from kvloom.structured.tools import (apply_template, check_tools, forced_constraint, output_parser,
                                             renders_tools, template_messages)
        setup = check_tools(tools, tool_choice, None)
        family = parser_for(tool_call_parser, self.tokenizer.hf.chat_template)
        rendered = renders_tools(self.tokenizer.hf)
        prompts = [apply_template(self.tokenizer, template_messages(c, setup, family, rendered),
                                  setup.tools if setup.active and rendered else None, add_generation_prompt)
                   for c in conversations]
        if setup.forced:
            params = dataclasses.replace(params, structured_outputs=forced_constraint(setup))
        results = self._run(prompts, params, use_tqdm)
        parser = output_parser(setup, family)
        for r in results:
            for o in r.outputs:
                message, _ = ChoiceOutput(parser, None, setup.parallel).message(o.text, o.finish_reason)
                o.tool_calls = message.get("tool_calls")
        return results

    def close_session(self, session_id: str) -> bool:
        """Release the KV an agent session kept between calls."""
        return self.engine.close_session(session_id)

    def _run_guided(self, prompts: list[Prompt], params: SamplingParams, scorer,
                    settings: dict) -> list[GenerationResult]:
        unknown = set(settings) - {"particles", "step_tokens", "temperature", "seed"}
        if unknown:
            raise InvalidRequestError(f"guided has unknown fields {sorted(unknown)}", field="guided")
        # all prompts' particles batched: each search resamples with its own seeded generator
        programs = [ParticleProgram(p, params, scorer, ParticleSearch(**settings), f"llm-{id(self)}-guided-{i}")
                    for i, p in enumerate(prompts)]
        return [self._searched(p, r, params) for p, r in zip(prompts, run_searches(self.engine, programs))]

    def _run_beams(self, prompts: list[Prompt], params: SamplingParams, width: int,
                   length_penalty: float) -> list[GenerationResult]:
        programs = [BeamProgram(p, params, width, length_penalty, f"llm-{id(self)}-beam-{i}")
                    for i, p in enumerate(prompts)]
        return [self._searched(p, r, params) for p, r in zip(prompts, run_searches(self.engine, programs))]

    @staticmethod
    def _searched(prompt: Prompt, result: SearchResult, params: SamplingParams) -> GenerationResult:
        outs = result.choices
        return GenerationResult(prompt, outs[0].prompt_token_ids if outs else [], [
            Completion(o.text, o.token_ids, o.finish_reason, o.logprobs if params.logprobs is not None else None,
                       o.stop_reason) for o in outs], outs[0].num_cached_tokens if outs else 0,
            kvloom=result.extension)

    def _run_scaled(self, prompts: list[Prompt], params: list[SamplingParams], spec: ScalingSpec,
                    session_id: str | None, lora) -> list[GenerationResult]:
        if len(params) != len(prompts) or any(p.n != params[0].n for p in params):
            raise InvalidRequestError("best_of / vote / adaptive take one n for all prompts and one sampling "
                                      "params per prompt", field="sampling_params")
        adapters = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(prompts)
        results = generate_scaled(self.engine, prompts, params, spec, f"llm-{id(self)}-scaled", adapters, session_id)
        out = []
        for prompt, p, r in zip(prompts, params, results):
            completions = [Completion(s.text, s.token_ids, s.finish_reason,
                                      s.output.logprobs if p.logprobs is not None else None, s.output.stop_reason,
                                      error=s.output.error) for s in r.chosen]
            out.append(GenerationResult(prompt, r.prompt_token_ids, completions, kvloom=r.extension))
        return out

    def _run(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams], use_tqdm: bool,
             session_id: str | None = None, lora: str | list[str | None] | None = None) -> list[GenerationResult]:
        engine = self.engine
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts",
                                      field="sampling_params")
        adapters = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(prompts)
        if len(adapters) != len(prompts):
            raise InvalidRequestError(f"{len(adapters)} LoRA names for {len(prompts)} prompts", field="lora")
        ids: list[str] = []
        try:
            for i, (prompt, p, adapter) in enumerate(zip(prompts, per_prompt, adapters)):
                ids.append(engine.add_request(prompt, p, request_id=f"llm-{id(self)}-{i}",
                                              session_id=session_id, lora=adapter))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finals: dict[tuple[str, int], RequestOutput] = {}
        bar = tqdm(total=sum(p.n for p in per_prompt), desc="Generating", unit="seq",
                   disable=not (use_tqdm and sys.stderr.isatty()))
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finals[(out.parent_id, out.index)] = out
                    bar.update(1)
        bar.close()
        results = []
        for prompt, rid, p in zip(prompts, ids, per_prompt):
            outs = [finals[(rid, k)] for k in range(p.n)]
            results.append(GenerationResult(prompt, outs[0].prompt_token_ids, [
                Completion(o.text, o.token_ids, o.finish_reason, o.logprobs, o.stop_reason, error=o.error) for o in outs],
                outs[0].num_cached_tokens))
        return results
