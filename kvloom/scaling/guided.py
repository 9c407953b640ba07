"""Guided search by particle filtering: K particles (samples of one family, sharing the prompt's KV) decode
rounds of `step_tokens` tokens; after each round a scorer weighs every particle's partial text, and K
particles are drawn again in proportion to exp(score / temperature): a particle drawn twice forks
(copy-on-write, nothing copied), one not drawn is aborted (its own blocks freed). Forks and aborts are the only
KV operations (pauses hold a round's particles while the others catch up or are graded). A particle that
finishes leaves the population with its final score; the search returns the best-scored finished particles.

A scorer is a Python callable (prompt, partial text) -> score, run at once, or an EngineScorer, whose grading
requests run in the engine as ordinary requests, batched with everything else (process_reward.py: the
served model grades the partial answers).
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams
from kvloom.scaling.search import Placement, SearchProgram, SearchResult, raise_failed, run_searches

Scorer = Callable[[object, str], float]     # (prompt, partial text) -> score, higher is better


@runtime_checkable
class EngineScorer(Protocol):
    """Scores texts through the engine: submit adds one request that grades `text`; read turns that request's
    finished output into the score."""

    def submit(self, engine: Engine, text: str, request_id: str, placement: Placement) -> None: ...

    def read(self, output: RequestOutput) -> float: ...


@dataclass
class ParticleSearch:
    particles: int = 8
    step_tokens: int = 8
    temperature: float = 1.0
    seed: int = 0

    def check(self, max_num_seqs: int, params: SamplingParams | None = None, prefix: str = "") -> None:
        """The settings (each error names `prefix` + the field), and with params the request's own."""
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or not (
                1 <= self.particles <= max_num_seqs):
            raise InvalidRequestError(f"{prefix}particles must be an integer in [1, max_num_seqs={max_num_seqs}], "
                                      f"got {self.particles!r}", field=f"{prefix}particles")
        if isinstance(self.step_tokens, bool) or not isinstance(self.step_tokens, int) or self.step_tokens < 1:
            raise InvalidRequestError(f"{prefix}step_tokens must be an integer >= 1, got {self.step_tokens!r}",
                                      field=f"{prefix}step_tokens")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not 0 < self.temperature < math.inf):
            raise InvalidRequestError(f"{prefix}temperature must be a number > 0, got {self.temperature!r}",
                                      field=f"{prefix}temperature")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidRequestError(f"{prefix}seed must be an integer, got {self.seed!r}", field=f"{prefix}seed")
        if params is None:
            return
        if params.greedy:
            raise InvalidRequestError("particle filtering samples: the request's temperature must be > 0",
                                      field="temperature")
        if params.n > self.particles:
            raise InvalidRequestError(f"n ({params.n}) must be <= particles ({self.particles})", field="n")
        if params.structured_outputs is not None:
            raise InvalidRequestError("guided search takes no output constraint (its particles fork)",
                                      field="structured_outputs")

    def resample(self, scores: list[float], rng: random.Random) -> list[int]:
        """How many copies of each particle the next round has (systematic resampling: low variance)."""
        top = max(scores)
        weights = [math.exp((s - top) / self.temperature) for s in scores]
        total = sum(weights)
        k = len(scores)
        u = rng.random() / k
        copies, cum, j = [0] * k, 0.0, 0
        for i, w in enumerate(weights):
            cum += w / total
            while j < k and u + j / k < cum:
                copies[i] += 1
                j += 1
        copies[-1] += k - sum(copies)      # (rounding at the top end)
        return copies


def particle_filter(engine: Engine, prompt, params: SamplingParams, scorer: Scorer | EngineScorer,
                    search: ParticleSearch, request_id: str = "guided") -> list[tuple[float, RequestOutput]]:
    """The finished particles (score, final output), best first."""
    program = ParticleProgram(prompt, params, scorer, search, request_id)
    run_searches(engine, [program])
    return program.ranked()


class ParticleProgram(SearchProgram):
    """One prompt's particle filter over the engine (offline: run_searches; served: AsyncEngine.run_search).

    A particle that reaches the round's end is paused; once every live particle has, their partial texts are
    scored (at once for a callable, by grading requests for an EngineScorer), then resampled and unpaused."""

    def __init__(self, prompt, params: SamplingParams, scorer: Scorer | EngineScorer, search: ParticleSearch,
                 request_id: str = "guided", placement: Placement = Placement()):
        self.prompt, self.params, self.scorer, self.search = prompt, params, scorer, search
        self.request_id, self.placement = request_id, placement
        self.rng = random.Random(search.seed)
        self.latest: dict[str, RequestOutput] = {}       # each live particle's last output, in population order
        self.live = search.particles
        self.boundary = search.step_tokens
        self.rounds = 0                                  # resampling rounds done
        self.finished: list[list] = []                   # [score or None while graded, final output]
        self.round: list[RequestOutput] | None = None    # the particles being scored for this round
        self.scores: dict[tuple, float] = {}             # ("round", i) / ("final", i) -> score
        self.grading: dict[str, tuple] = {}              # grading request id -> its score's key
        self.graded = 0                                  # grading requests made
        self.lengths: dict[str, int] = {}                # particle -> its tokens (a fork starts at its source's)
        self.tokens_drawn = 0

    def start(self, engine: Engine) -> None:
        self.search.check(engine.config.max_num_seqs, self.params)
        seed = self.params.seed if self.params.seed is not None else self.rng.getrandbits(62)
        params = dataclasses.replace(self.params, n=self.search.particles, seed=seed)
        self.placement.add(engine, self.prompt, params, self.request_id)

    def owns(self, parent_id: str) -> bool:
        return parent_id == self.request_id or parent_id in self.grading

    def advance(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        raise_failed(outputs)
        for out in outputs:
            if out.parent_id != self.request_id:
                if out.finished:
                    self.scores[self.grading.pop(out.parent_id)] = float(self.scorer.read(out))
                continue
            self.tokens_drawn += len(out.token_ids) - self.lengths.get(out.request_id, 0)
            self.lengths[out.request_id] = len(out.token_ids)
            if out.finished:
                self.latest.pop(out.request_id, None)
                self.live -= 1
                self.finished.append([None, out])
                self._ask(engine, ("final", len(self.finished) - 1), out.text)
            else:
                self.latest[out.request_id] = out
                if len(out.token_ids) >= self.boundary:
                    engine.pause_sample(out.request_id)      # waits for the round's resampling
        alive = list(self.latest.values())
        if (self.round is None and alive and len(alive) == self.live
                and all(len(o.token_ids) >= self.boundary for o in alive)):
            self.round = alive
            for i, o in enumerate(alive):
                self._ask(engine, ("round", i), o.text)
        if self.round is not None and all(("round", i) in self.scores for i in range(len(self.round))):
            self._resample(engine)
        for i, entry in enumerate(self.finished):
            if entry[0] is None:
                entry[0] = self.scores.pop(("final", i), None)
        self.done = self.live == 0 and not self.grading

    def _ask(self, engine: Engine, key: tuple, text: str) -> None:
        if isinstance(self.scorer, EngineScorer):
            rid = f"{self.request_id}-grade{self.graded}"
            self.graded += 1
            self.grading[rid] = key
            self.scorer.submit(engine, text, rid, self.placement)
        else:
            self.scores[key] = float(self.scorer(self.prompt, text))

    def _resample(self, engine: Engine) -> None:
        alive = self.round
        copies = self.search.resample([self.scores.pop(("round", i)) for i in range(len(alive))], self.rng)
        for o, c in zip(alive, copies):            # forks first: a fork needs its source
            for _ in range(c - 1):
                child = engine.fork_sample(o.request_id, seed=self.rng.getrandbits(62))
                self.latest[child] = dataclasses.replace(o, request_id=child)
                self.lengths[child] = self.lengths[o.request_id]
        for o, c in zip(alive, copies):
            if c == 0:
                engine.abort_sample(o.request_id)
                self.latest.pop(o.request_id, None)
        for sid in self.latest:
            engine.unpause_sample(sid)
        self.live = len(self.latest)
        self.round = None
        self.rounds += 1
        self.boundary += self.search.step_tokens

    def close(self, engine: Engine) -> None:
        engine.abort_request(self.request_id)
        for rid in list(self.grading):
            engine.abort_request(rid)
        self.grading.clear()

    def ranked(self) -> list[tuple[float, RequestOutput]]:
        """The finished particles (score, final output), best first (ties: the first finished first)."""
        return sorted(((s, o) for s, o in self.finished if s is not None), key=lambda f: -f[0])

    def result(self) -> SearchResult:
        ranked = self.ranked()
        best = ranked[:self.params.n]
        return SearchResult([dataclasses.replace(o, index=j) for j, (_, o) in enumerate(best)],
                            {"strategy": "guided_search", "rounds": self.rounds, "scores": [s for s, _ in best],
                             "particles_finished": len(ranked), "grading_requests": self.graded,
                             "completion_tokens": self.tokens_drawn}, self.tokens_drawn)
