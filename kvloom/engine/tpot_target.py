"""Holding the time per output token under a target, on whatever host the engine runs.

A step that carries decodes is the next inter-token gap of every request decoding in it, so its prompt
chunks get only the tokens the target leaves. What a step of T tokens costs is learned from the steps
themselves: seconds = per_step + per_token * T, an exponentially weighted least-squares fit over the
recent steps (each observed from its start to the next step's, so the work between steps counts too).
It follows the host's speed, the context lengths and the mix of the batch as they change; a fixed token
budget holds a target on the host it was tuned on only (the same burst ran at TPOT p99 87-90 ms one
evening and 127-159 ms the next, on the same code).

One line through every step's cost is not exact: a decode row costs more than a prompt token (its logits
and its attention over the context), and the prompt-only steps at the start of a burst pull the line their
way. So the steps that carry decodes, the ones the target paces, also keep a correction: the running mean of
their measured time over the fit's prediction for them, which scales the fit where the pacing works (without
it, the avx2 burst's paced steps ran ~5% over their plan: docs/results/cpu_class/tpot_target_first_fit/).

When the decodes alone fill the target, no new request is admitted until some finish, so the requests
running keep their pace while new ones wait in the queue; prompts already under way still take a small
chunk a step, so they finish. A step without decodes (prompts only) has nobody's pace to keep and takes
the whole token budget.
"""
from __future__ import annotations

import math

HEADROOM = 0.9     # aim below the target: a request's TPOT is the mean of its steps, and the fit is an estimate
HALF_LIFE = 32     # steps after which an observation weighs half
BIAS_RATE = 0.1    # how fast the correction of the fit (below) follows the paced steps
MIN_CHUNK = 16     # prompt tokens a step still takes when the decodes fill the target (prompts under way finish)


class TpotTarget:
    def __init__(self, target_s: float, min_chunk: int = MIN_CHUNK, half_life: float = HALF_LIFE):
        if not target_s > 0:
            raise ValueError(f"the TPOT target must be > 0 seconds, got {target_s}")
        self.target_s = target_s
        self.min_chunk = min_chunk
        self._decay = 0.5 ** (1.0 / half_life)
        self._w = self._x = self._y = self._xx = self._xy = 0.0   # weighted sums of 1, T, s, T^2, T*s
        self.num_observed = 0
        self.bias = 1.0      # measured / predicted seconds of the paced steps (running mean)

    def observe(self, num_tokens: int, seconds: float, paced: bool = True) -> None:
        """One step: the tokens it carried, the seconds from its start to the next step's, and whether it
        carried decodes (was paced)."""
        if num_tokens <= 0 or not seconds > 0:
            return
        predicted = self.predict(num_tokens)
        if paced and predicted:
            ratio = min(2.0, max(0.5, seconds / predicted))
            self.bias += BIAS_RATE * (ratio - self.bias)
        d = self._decay
        x, y = float(num_tokens), seconds
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self.num_observed += 1

    def cost(self) -> tuple[float, float] | None:
        """(seconds per step, seconds per token) of the fit; None before any step was observed."""
        if self.num_observed == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1e-6 * mx * mx:
            per_token = (self._xy / self._w - mx * my) / var
            per_step = my - per_token * mx
            if per_token > 0 and per_step >= 0:
                return per_step, per_token
        # One step size so far, or a fit the noise bent: every second on the tokens.
        return 0.0, self._y / self._x

    def predict(self, num_tokens: int) -> float | None:
        """Seconds of a step of num_tokens by the fit alone (no correction); None before any step."""
        c = self.cost()
        return None if c is None else c[0] + c[1] * num_tokens

    def tokens_within(self) -> int | None:
        """Tokens a step can carry and still end inside the target (with headroom); None until measured."""
        c = self.cost()
        if c is None:
            return None
        per_step, per_token = c
        return max(0, math.floor((self.target_s * HEADROOM / self.bias - per_step) / per_token))

    def describe(self) -> dict:
        c = self.cost()
        return {"target_ms": self.target_s * 1e3, "steps_observed": self.num_observed,
                "step_ms": None if c is None else round(c[0] * 1e3, 3),
                "token_ms": None if c is None else round(c[1] * 1e3, 4),
                "correction": round(self.bias, 4),
                "tokens_within_target": self.tokens_within()}
