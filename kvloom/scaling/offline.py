"""Drives scaling strategies over a synchronous Engine: every query's rounds run batched together, each round
one engine request whose samples share the prompt's KV (later rounds find its full blocks in the prefix cache).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.spec import ScalingSpec
from kvloom.scaling.strategy import Sample, Strategy


def round_params(params: SamplingParams, spec: ScalingSpec, size: int, first_index: int, base_seed: int) -> SamplingParams:
    """The params of one round of `size` samples: sample k of the query draws with base_seed + k (the engine
    adds the index within the round), and logprobs are kept when the ranking needs them."""
    logprobs = 0 if spec.needs_logprobs and params.logprobs is None else params.logprobs
    seed = params.seed if params.greedy else base_seed + first_index
    return dataclasses.replace(params, n=size, seed=seed, logprobs=logprobs)


def base_seed(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else random.getrandbits(62)


def to_sample(index: int, out: RequestOutput) -> Sample:
    return Sample(index, out.text, out.token_ids, out.finish_reason, out.cumulative_logprob, out)


@dataclass
class ScaledResult:
    strategy: Strategy
    prompt_token_ids: list[int]
    tokens_drawn: int

    @property
    def chosen(self) -> list[Sample]:
        return self.strategy.chosen()

    @property
    def extension(self) -> dict:
        return self.strategy.extension(self.tokens_drawn)


def generate_scaled(engine: Engine, prompts: list, params: list[SamplingParams], spec: ScalingSpec,
                    id_prefix: str, lora: list[str | None] | None = None,
                    session_id: str | None = None) -> list[ScaledResult]:
    """One ScaledResult per prompt. Rounds of every query are in flight together; a query whose strategy has
    seen enough aborts its running round's other samples at once."""
    strategies = [Strategy(spec, p) for p in prompts]
    seeds = [base_seed(p) for p in params]
    lora = lora or [None] * len(prompts)
    rounds: dict[str, list[int]] = {}        # engine request id -> [query, first sample index, samples left]
    tokens: dict[tuple[int, int], int] = {}  # (query, sample) -> tokens drawn so far
    prompt_ids: dict[int, list[int]] = {}

    def launch(i: int) -> None:
        size = strategies[i].next_round()
        if size:
            first = strategies[i].drawn - size
            rid = f"{id_prefix}-{i}-s{first}"
            engine.add_request(prompts[i], round_params(params[i], spec, size, first, seeds[i]), request_id=rid,
                               session_id=session_id, lora=lora[i])
            rounds[rid] = [i, first, size]

    try:
        for i in range(len(prompts)):
            launch(i)
        while engine.has_unfinished():
            for out in engine.step():
                entry = rounds.get(out.parent_id)
                if entry is None:          # a round aborted earlier in this step's list
                    continue
                i, first, _ = entry
                prompt_ids.setdefault(i, out.prompt_token_ids)
                tokens[(i, first + out.index)] = len(out.token_ids)
                if not out.finished:
                    continue
                entry[2] -= 1
                if strategies[i].observe(to_sample(first + out.index, out)) and entry[2]:
                    engine.abort_request(out.parent_id)
                    entry[2] = 0
                if entry[2] == 0:
                    del rounds[out.parent_id]
                    launch(i)
    finally:
        for rid in rounds:
            engine.abort_request(rid)
    return [ScaledResult(s, prompt_ids.get(i, []), sum(v for (q, _), v in tokens.items() if q == i))
            for i, s in enumerate(strategies)]
