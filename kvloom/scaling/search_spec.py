"""A server request's search settings (beam search, guided search), read and checked once: a bad value is an
InvalidRequestError naming the field (a 400) before anything runs; program() makes one prompt's search.

Beam search takes vLLM's fields: `use_beam_search`, `beam_width` (default: `n`, as vLLM's server uses n),
`length_penalty`. Guided search is the kvloom extra `guided_search: {"particles", "step_tokens",
"temperature", "seed", "scorer"}`, graded by the served model (process_reward.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.beam import BeamProgram, check_beam_settings
from kvloom.scaling.guided import ParticleProgram, ParticleSearch
from kvloom.scaling.process_reward import ProcessReward
from kvloom.scaling.search import Placement, SearchProgram

GUIDED_FIELDS = {"particles", "step_tokens", "temperature", "seed", "scorer"}
# Beam search is deterministic (transformers' beam search): sampling settings would be ignored, so they are refused.
_BEAM_NEUTRAL = {"temperature": (None, 0, 0.0), "top_p": (None, 1, 1.0), "top_k": (None, 0, -1),
                 "min_p": (None, 0, 0.0)}


@dataclass(frozen=True)
class SearchSpec:
    kind: str                               # "beam_search" | "guided_search"
    beam_width: int = 0
    length_penalty: float = 1.0
    particles: ParticleSearch | None = None
    scorer: object = None                   # guided: the scorer field as given (each prompt grades its question)

    @classmethod
    def from_request(cls, req, scaling_kind: str | None) -> SearchSpec | None:
        """None when the request asks for no search. scaling_kind: best_of / vote / adaptive, if asked for."""
        beam, guided = bool(req.use_beam_search), req.guided_search
        if not beam:
            if req.beam_width is not None:
                raise InvalidRequestError("beam_width applies to beam search: set use_beam_search", field="beam_width")
            if req.length_penalty not in (None, 1, 1.0):
                raise InvalidRequestError("length_penalty applies to beam search: set use_beam_search",
                                          field="length_penalty")
        if not beam and guided is None:
            return None
        name = "use_beam_search" if beam else "guided_search"
        if beam and guided is not None:
            raise InvalidRequestError("use_beam_search cannot be combined with guided_search", field="guided_search")
        if scaling_kind is not None:
            raise InvalidRequestError(f"{name} cannot be combined with {scaling_kind}", field=name)
        what = "beam search" if beam else "guided search"
        if req.stream:
            raise InvalidRequestError(f"{what} picks its choices once the search is done: it cannot stream",
                                      field="stream")
        if getattr(req, "echo", False):
            raise InvalidRequestError(f"echo cannot be combined with {what}", field="echo")
        if req.session_id is not None:
            raise InvalidRequestError(f"{what} keeps no session KV (its samples are aborted or forked): drop "
                                      "session_id", field="session_id")
        if beam:
            for f, neutral in _BEAM_NEUTRAL.items():
                if getattr(req, f) not in neutral:
                    raise InvalidRequestError(f"beam search is deterministic: {f} does not apply (leave it unset)",
                                              field=f)
            width = req.n if req.beam_width is None else req.beam_width
            return cls("beam_search", width, 1.0 if req.length_penalty is None else req.length_penalty)
        return cls("guided_search", particles=_particles(guided, req.seed), scorer=_scorer(guided))

    def check(self, params: SamplingParams, max_num_seqs: int) -> None:
        if self.kind == "beam_search":
            check_beam_settings(self.beam_width, params.n, self.length_penalty, params, max_num_seqs)
        else:
            self.particles.check(max_num_seqs, params, prefix="guided_search.")

    def program(self, prompt_ids: list[int], params: SamplingParams, request_id: str, placement: Placement,
                question: str, tokenizer, max_model_len: int) -> SearchProgram:
        if self.kind == "beam_search":
            return BeamProgram(prompt_ids, params, self.beam_width, self.length_penalty, request_id, placement)
        scorer = ProcessReward.from_field(self.scorer, question)
        scorer.check_fits(tokenizer, max_model_len, len(prompt_ids), params.max_tokens)
        return ParticleProgram(prompt_ids, params, scorer, self.particles, request_id, placement)


def _particles(guided, request_seed: int | None) -> ParticleSearch:
    if not isinstance(guided, dict):
        raise InvalidRequestError(f"guided_search must be an object, got {guided!r}", field="guided_search")
    unknown = set(guided) - GUIDED_FIELDS
    if unknown:
        raise InvalidRequestError(f"guided_search has unknown fields {sorted(unknown)} (known: "
                                  f"{sorted(GUIDED_FIELDS)})", field="guided_search")
    default_seed = request_seed if request_seed is not None else random.getrandbits(62)
    search = ParticleSearch(guided.get("particles", 8), guided.get("step_tokens", 8),
                            guided.get("temperature", 1.0), guided.get("seed", default_seed))
    search.check(max_num_seqs=1 << 30, prefix="guided_search.")     # the engine's bound is checked later
    return search


def _scorer(guided: dict):
    scorer = guided.get("scorer")
    ProcessReward.from_field(scorer, "")     # checked now; built per prompt (each grades its own question)
    return scorer
