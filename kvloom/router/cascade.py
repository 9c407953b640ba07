"""A confidence cascade (FrugalGPT, MoMA): answer with the small model, escalate to the big one when the small
model's own confidence in its answer is below a threshold."""
from __future__ import annotations

import math

CONFIDENCE_MEASURES = ("mean_logprob", "min_logprob")


def confidence(token_logprobs: list[float], measure: str = "mean_logprob") -> float:
    """The small model's confidence from the logprobs of the tokens it chose: their mean (the geometric mean
    probability, in log space) or their minimum (the least sure token). An empty answer has no confidence."""
    if not token_logprobs:
        return -math.inf
    if measure == "mean_logprob":
        return sum(token_logprobs) / len(token_logprobs)
    if measure == "min_logprob":
        return min(token_logprobs)
    raise ValueError(f"confidence measure must be one of {', '.join(CONFIDENCE_MEASURES)}, got {measure!r}")


def should_escalate(token_logprobs: list[float], threshold: float, measure: str = "mean_logprob") -> bool:
    """True when the confidence is strictly below the threshold."""
    return confidence(token_logprobs, measure) < threshold
