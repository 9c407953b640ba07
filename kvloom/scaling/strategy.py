"""What a scaling strategy decides: how many samples to draw next, when it has seen enough, what it returns.

No I/O here: the offline driver (scaling/offline.py) and the server (server/serving.py) launch the rounds
(one engine request of n samples each, sharing the prompt's KV), feed finished samples in, and abort a round's
unfinished samples once observe() says stop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvloom.scaling.answers import extract_answer, leader_posterior, majority
from kvloom.scaling.spec import ScalingSpec


@dataclass
class Sample:
    index: int                   # in draw order over all rounds
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None
    output: Any = None           # the engine's RequestOutput (the response's logprobs come from it)
    answer: str | None = None
    score: float | None = None


@dataclass
class Strategy:
    spec: ScalingSpec
    prompt: Any = None           # passed to a callable scorer
    samples: list[Sample] = field(default_factory=list)
    drawn: int = 0               # samples launched so far
    stopped: bool = False

    def next_round(self) -> int:
        """How many samples to launch now (0: no more). Called when no round of this query is running."""
        if self.stopped or self.drawn >= self.spec.num_samples:
            return 0
        size = self.spec.round_size if self.spec.kind == "adaptive" else self.spec.num_samples
        size = min(size, self.spec.num_samples - self.drawn)
        self.drawn += size
        return size

    def observe(self, s: Sample) -> bool:
        """A finished sample; True: enough has been seen, abort the samples still running."""
        s.answer = extract_answer(s.text, self.spec.pattern)
        self.samples.append(s)
        if self.spec.kind == "adaptive" and leader_posterior(majority(self.answers)[1]) >= self.spec.confidence:
            self.stopped = True
        return self.stopped

    @property
    def answers(self) -> list[str | None]:
        return [s.answer for s in self.samples]

    def chosen(self) -> list[Sample]:
        """The samples returned as choices: best_of's top n by score, else the first sample of the majority
        answer (the first sample when no sample has an answer)."""
        if not self.samples:
            return []
        if self.spec.kind == "best_of":
            for s in self.samples:
                if s.score is None:      # a scorer may be costly (or a model): once a sample
                    s.score = self._score(s)
            return sorted(self.samples, key=lambda s: (-s.score, s.index))[:self.spec.n]
        winner, _ = majority(self.answers)
        return [next((s for s in self.samples if s.answer == winner), self.samples[0])]

    def _score(self, s: Sample) -> float:
        scorer = self.spec.scorer
        if callable(scorer):
            return float(scorer(self.prompt, s.text))
        lp = s.cumulative_logprob if s.cumulative_logprob is not None else float("-inf")
        return lp / max(1, len(s.token_ids)) if scorer == "mean_logprob" else lp

    def extension(self, tokens_drawn: int) -> dict:
        """The response's `kvloom` object."""
        ext: dict = {"strategy": self.spec.kind, "samples_used": len(self.samples),
                     "samples_aborted": self.drawn - len(self.samples), "completion_tokens": tokens_drawn}
        if self.spec.kind == "best_of":
            ext["scores"] = [s.score for s in sorted(self.samples, key=lambda s: s.index)]
            ext["chosen"] = [s.index for s in self.chosen()]
        else:
            winner, counts = majority(self.answers)
            ext["vote"] = {"answer": winner, "share": counts[winner] / len(self.samples) if winner else 0.0,
                           "counts": dict(counts.most_common()), "no_answer": self.answers.count(None)}
            if self.spec.kind == "adaptive":
                ext["vote"]["posterior"] = leader_posterior(counts)
                ext["stopped_early"] = self.stopped
        return ext
