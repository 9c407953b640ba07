"""Guided search by particle filtering: K particles (samples of one family, sharing the prompt's KV) decode
rounds of `step_tokens` tokens; after each round a scorer weighs every particle's partial text, and K
particles are drawn again in proportion to exp(score / temperature): a particle drawn twice forks
(copy-on-write, nothing copied), one not drawn is aborted (its own blocks freed). Forks and aborts are the only
KV operations. A particle that finishes leaves the population with its last score; the search returns the
best-scored finished particles.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from kvloom.engine.engine import Engine
from kvloom.engine.outputs import RequestOutput
from kvloom.errors import InvalidRequestError
from kvloom.sampling_params import SamplingParams

Scorer = Callable[[object, str], float]     # (prompt, partial text) -> score, higher is better


@dataclass
class ParticleSearch:
    particles: int = 8
    step_tokens: int = 8
    temperature: float = 1.0
    seed: int = 0
    rounds: int = 0                                          # resampling rounds done
    finished: list[tuple[float, RequestOutput]] = field(default_factory=list)

    def check(self, max_num_seqs: int) -> None:
        if not isinstance(self.particles, int) or not 1 <= self.particles <= max_num_seqs:
            raise InvalidRequestError(f"particles must be an integer in [1, max_num_seqs={max_num_seqs}]",
                                      field="particles")
        if not isinstance(self.step_tokens, int) or self.step_tokens < 1:
            raise InvalidRequestError("step_tokens must be an integer >= 1", field="step_tokens")
        if not self.temperature > 0:
            raise InvalidRequestError("temperature must be > 0", field="temperature")

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


def particle_filter(engine: Engine, prompt, params: SamplingParams, scorer: Scorer, search: ParticleSearch,
                    request_id: str = "guided") -> list[tuple[float, RequestOutput]]:
    """The finished particles (score, final output), best first."""
    search.check(engine.config.max_num_seqs)
    if params.greedy:
        raise InvalidRequestError("particle filtering samples: temperature must be > 0", field="temperature")
    rng = random.Random(search.seed)
    params = dataclasses.replace(params, n=search.particles, seed=params.seed if params.seed is not None
                                 else rng.getrandbits(62))
    engine.add_request(prompt, params, request_id=request_id)
    latest: dict[str, RequestOutput] = {}      # each live particle's last output
    counts = {"live": search.particles}
    boundary = search.step_tokens
    try:
        while counts["live"]:
            for out in engine.step():
                if out.parent_id != request_id:
                    continue
                if out.finished:
                    latest.pop(out.request_id, None)
                    counts["live"] -= 1
                    search.finished.append((float(scorer(prompt, out.text)), out))
                else:
                    latest[out.request_id] = out
            alive = list(latest.values())
            if alive and len(alive) == counts["live"] and all(len(o.token_ids) >= boundary for o in alive):
                _resample_round(engine, prompt, scorer, search, rng, alive, latest, counts)
                boundary += search.step_tokens
    finally:
        engine.abort_request(request_id)
    return sorted(search.finished, key=lambda f: -f[0])


def _resample_round(engine: Engine, prompt, scorer: Scorer, search: ParticleSearch, rng: random.Random,
                    alive: list[RequestOutput], latest: dict[str, RequestOutput], counts: dict) -> None:
    scores = [float(scorer(prompt, o.text)) for o in alive]
    copies = search.resample(scores, rng)
    for o, c in zip(alive, copies):            # forks first: a fork needs its source
        for _ in range(c - 1):
            child = engine.fork_sample(o.request_id, seed=rng.getrandbits(62))
            latest[child] = dataclasses.replace(o, request_id=child)
    for o, c in zip(alive, copies):
        if c == 0:
            engine.abort_sample(o.request_id)
            latest.pop(o.request_id, None)
    counts["live"] = len(latest)
    search.rounds += 1
