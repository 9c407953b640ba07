"""A request's scaling settings (best_of, vote, adaptive), read and checked once: a bad value is an
InvalidRequestError naming the field (a 400 in the server) before anything runs."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kvloom.errors import InvalidRequestError

MAX_SAMPLES = 256              # per query: a bound on what one request may cost
SCORERS = ("logprob", "mean_logprob")   # built-in best_of rankings; offline, a callable(prompt, text) -> float


@dataclass(frozen=True)
class ScalingSpec:
    kind: str                   # "best_of" | "vote" | "adaptive"
    num_samples: int            # best_of's N, vote's n, adaptive's max_n
    n: int = 1                  # choices returned
    scorer: str | Callable = "logprob"
    pattern: re.Pattern | None = None   # the final answer's extractor (vote, adaptive); None: the whole text
    confidence: float = 1.0     # adaptive: stop once the leader's posterior reaches it
    round_size: int = 0         # adaptive: samples drawn per round

    @property
    def needs_logprobs(self) -> bool:
        return self.kind == "best_of" and self.scorer in SCORERS

    @classmethod
    def from_fields(cls, n: int = 1, best_of: int | None = None, vote: dict | None = None,
                    adaptive: dict | None = None, scorer: str | Callable | None = None) -> ScalingSpec | None:
        """None when the request asks for no scaling (best_of absent or equal to n, no vote, no adaptive)."""
        if adaptive is not None:
            if best_of is not None:
                raise InvalidRequestError("adaptive cannot be combined with best_of", field="adaptive")
            return _adaptive(n, adaptive, vote)
        if vote is not None:
            if best_of is not None:
                raise InvalidRequestError("vote cannot be combined with best_of", field="vote")
            return _vote(n, vote)
        if best_of is None or best_of == n:
            if scorer is not None:
                raise InvalidRequestError("scorer ranks best_of samples: set best_of > n", field="scorer")
            return None
        _count(best_of, "best_of")
        if best_of < n:
            raise InvalidRequestError(f"best_of must be >= n, got best_of={best_of} with n={n}", field="best_of")
        scorer = "logprob" if scorer is None else scorer
        if not callable(scorer) and scorer not in SCORERS:
            raise InvalidRequestError(f"scorer must be one of {list(SCORERS)}, got {scorer!r}", field="scorer")
        return cls("best_of", best_of, n, scorer)


def _count(v, field: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SAMPLES:
        raise InvalidRequestError(f"{field} must be an integer in [1, {MAX_SAMPLES}], got {v!r}", field=field)
    return v


def _fields(d, name: str, allowed: set[str]) -> dict:
    if not isinstance(d, dict):
        raise InvalidRequestError(f"{name} must be an object, got {d!r}", field=name)
    unknown = set(d) - allowed
    if unknown:
        raise InvalidRequestError(f"{name} has unknown fields {sorted(unknown)} (known: {sorted(allowed)})",
                                  field=name)
    return d


def _pattern(d: dict, field: str) -> re.Pattern | None:
    regex = d.get("extract")
    if regex is None:
        return None
    if not isinstance(regex, str) or not regex:
        raise InvalidRequestError(f"{field} must be a non-empty regular expression string", field=field)
    try:
        return re.compile(regex)
    except re.error as e:
        raise InvalidRequestError(f"{field} is not a valid regular expression: {e}", field=field) from e


def _single_choice(n: int, name: str) -> None:
    if n != 1:
        raise InvalidRequestError(f"{name} returns one choice (the majority's): n must be 1, got {n}", field="n")


def _vote(n: int, vote) -> ScalingSpec:
    vote = _fields(vote, "vote", {"extract", "n"})
    _single_choice(n, "vote")
    if "extract" not in vote:
        raise InvalidRequestError("vote needs extract: a regular expression for the final answer",
                                  field="vote.extract")
    return ScalingSpec("vote", _count(vote.get("n"), "vote.n"), pattern=_pattern(vote, "vote.extract"))


def _adaptive(n: int, adaptive, vote) -> ScalingSpec:
    adaptive = _fields(adaptive, "adaptive", {"max_n", "confidence", "extract", "round"})
    _single_choice(n, "adaptive")
    max_n = _count(adaptive.get("max_n"), "adaptive.max_n")
    p = adaptive.get("confidence", 0.95)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.5 <= p < 1:
        raise InvalidRequestError(f"adaptive.confidence must be a number in [0.5, 1), got {p!r}",
                                  field="adaptive.confidence")
    round_size = _count(adaptive.get("round", min(4, max_n)), "adaptive.round")
    pattern = _pattern(adaptive, "adaptive.extract")
    if vote is not None:     # vote's extractor; its n would contradict max_n, so it must not differ
        vote = _fields(vote, "vote", {"extract", "n"})
        if vote.get("n", max_n) != max_n:
            raise InvalidRequestError("with adaptive, the number of samples is adaptive.max_n: drop vote.n",
                                      field="vote.n")
        if pattern is None:
            pattern = _pattern(vote, "vote.extract")
    return ScalingSpec("adaptive", max_n, pattern=pattern, confidence=float(p), round_size=min(round_size, max_n))
