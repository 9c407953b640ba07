"""A confidence cascade (FrugalGPT, MoMA): answer with the small model, escalate to the big one when the small
model's own confidence in its answer is below a threshold."""
from __future__ import annotations

import math

CONFIDENCE_MEASURES = ("mean_logprob", "min_logprob", "neg_entropy")
TOP_FOR_ENTROPY = 5          # alternatives per token the entropy is estimated from


def confidence(token_logprobs: list[float], measure: str = "mean_logprob",
               top_logprobs: list[list[float]] | None = None) -> float:
    """The small model's confidence from the logprobs of the tokens it chose: their mean (the geometric mean
    probability, in log space), their minimum (the least sure token), or minus the mean entropy of each step's
    distribution, estimated from its top alternatives (top_logprobs; the tail's mass left out, so a lower
    bound of the entropy). An empty answer has no confidence."""
    if not token_logprobs:
        return -math.inf
    if measure == "mean_logprob":
        return sum(token_logprobs) / len(token_logprobs)
    if measure == "min_logprob":
        return min(token_logprobs)
    if measure == "neg_entropy":
        if not top_logprobs:
            return -math.inf
        return -sum(-sum(math.exp(lp) * lp for lp in step) for step in top_logprobs) / len(top_logprobs)
    raise ValueError(f"confidence measure must be one of {', '.join(CONFIDENCE_MEASURES)}, got {measure!r}")


def should_escalate(token_logprobs: list[float], threshold: float, measure: str = "mean_logprob",
                    top_logprobs: list[list[float]] | None = None) -> bool:
    """True when the confidence is strictly below the threshold."""
    return confidence(token_logprobs, measure, top_logprobs) < threshold
