"""Holding the time per output token under a target, on whatever host the engine runs.

A step that carries decodes is the next inter-token gap of every request decoding in it, so its prompt
chunks get only the time the target leaves. What a step costs is learned from the steps themselves:
seconds = per_step + per_decode * D + per_prompt_token * P for D decode rows and P prompt (or draft) tokens,
an exponentially weighted least-squares fit over the recent steps, each observed from its start to the next
step's, so the work between steps counts too. It follows the host's speed, the context lengths and the mix
of the batch as they change; a fixed token budget holds a target on the host it was tuned on only (the avx2
burst's TPOT p99 was 87-90 ms in one sitting and 120-159 ms three hours later, the VM that much slower:
docs/performance.md, issue 14).

Decode rows and prompt tokens are apart because they cost apart: a decode row brings its logits and its
attention over the whole context (the avx2 burst's fit: 2.1 ms a decode row, 1.0 ms a prompt token,
docs/results/cpu_class/tpot_target_two_features_avx2/). One line through all tokens ran the avx2 burst's
paced steps ~5% over their plan (docs/results/cpu_class/tpot_target_first_fit/). What the fit still
misses, the paced steps correct: the running mean of their measured time over the fit's prediction scales
the fit.

The target is each request's mean, not each step's: a request that ran its steps under it has slack (the
target times its steps so far, less their time), and a step may run over by the least slack among its
decodes, and by one target at most (a host whose plain decode steps beat the target banks time that
prompt chunks then spend). As far as the fit predicts, every request stays at or under the target after
every step, so its TPOT ends there too.

When the decodes fill the target, no new request is admitted until some finish, so the requests running
keep their pace while new ones wait in the queue; prompts already under way still take a small chunk a
step, so they finish. A step without decodes (prompts only) has nobody's pace to keep and takes the whole
token budget.
"""
from __future__ import annotations

import math

HEADROOM = 0.9          # aim below the target: a request's TPOT is the mean of its steps, and the fit is an estimate
HALF_LIFE = 32          # steps after which an observation weighs half
CORRECTION_RATE = 0.1   # how fast the fit's correction (above) follows the paced steps
MIN_CHUNK = 16          # prompt tokens a step still takes when the decodes fill the target (prompts under way finish)


class TpotTarget:
    def __init__(self, target_s: float, min_chunk: int = MIN_CHUNK, half_life: float = HALF_LIFE):
        if not target_s > 0:
            raise ValueError(f"the TPOT target must be > 0 seconds, got {target_s}")
        self.target_s = target_s
        self.min_chunk = min_chunk
        self._decay = 0.5 ** (1.0 / half_life)
        self._m = [[0.0] * 3 for _ in range(3)]   # weighted sums of f f^T, f = (1, decodes, prompt tokens)
        self._v = [0.0] * 3                       # weighted sums of f * seconds
        self.num_observed = 0
        self._cost: tuple[float, float, float] | None = None   # the fit of the sums above, solved once a step
        self.correction = 1.0   # measured / predicted seconds of the paced steps (running mean)
        self._paces: dict[str, list[float]] = {}   # request id -> [its decode steps, their seconds]

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float, paced: bool = True,
                decoded: tuple[str, ...] = ()) -> None:
        """One step: its decode rows, its other tokens (prompt chunks, drafts), the seconds from its start to
        the next step's, whether it was paced (carried decodes), and the requests that decoded in it."""
        if num_decodes + num_prompt_tokens <= 0 or not seconds > 0:
            return
        for rid in decoded:
            pace = self._paces.setdefault(rid, [0.0, 0.0])
            pace[0] += 1
            pace[1] += seconds
        predicted = self.predict(num_decodes, num_prompt_tokens)
        if paced and predicted:
            ratio = min(2.0, max(0.5, seconds / predicted))
            self.correction += CORRECTION_RATE * (ratio - self.correction)
        f = (1.0, float(num_decodes), float(num_prompt_tokens))
        d = self._decay
        for i in range(3):
            self._v[i] = self._v[i] * d + f[i] * seconds
            for j in range(3):
                self._m[i][j] = self._m[i][j] * d + f[i] * f[j]
        self.num_observed += 1
        self._cost = self._solve()

    def cost(self) -> tuple[float, float, float] | None:
        """(seconds per step, per decode row, per prompt token); None before any step was observed."""
        return self._cost

    def _solve(self) -> tuple[float, float, float]:
        m, v = self._m, self._v
        ridge = 1e-12 * (m[0][0] + m[1][1] + m[2][2])   # keeps the solve defined; moves no real fit
        fit = _solve3([[m[i][j] + (ridge if i == j else 0.0) for j in range(3)] for i in range(3)], v)
        if fit is not None and fit[1] > 0 and fit[2] > 0:
            return max(0.0, fit[0]), fit[1], fit[2]
        # One mix of steps so far, or a fit the noise bent: every second on the tokens, alike.
        per_token = v[0] / (m[0][1] + m[0][2])
        return 0.0, per_token, per_token

    def predict(self, num_decodes: int, num_prompt_tokens: int) -> float | None:
        """Seconds of such a step by the fit alone (no correction); None before any step."""
        c = self.cost()
        return None if c is None else c[0] + c[1] * num_decodes + c[2] * num_prompt_tokens

    def forget(self, request_id: str) -> None:
        """The request has left (finished, aborted, moved): its pace no longer counts."""
        self._paces.pop(request_id, None)

    def slack(self, request_ids) -> float:
        """Seconds the next step may run over the target and keep each of these requests' mean inside it:
        the least of their slacks, at most one more target (a step of two targets at most)."""
        goal = self.target_s * HEADROOM
        least = goal
        for rid in request_ids:
            pace = self._paces.get(rid)   # none yet: its first decode step, no slack
            least = min(least, 0.0 if pace is None else goal * pace[0] - pace[1])
        return max(0.0, least)

    def _room(self, slack: float = 0.0) -> float:
        return (self.target_s * HEADROOM + slack) / self.correction

    def prompt_tokens_within(self, num_decodes: int, slack: float = 0.0) -> int | None:
        """Prompt tokens a step with these decodes can carry inside the target, running over it by at most
        `slack` seconds (see slack()); None until measured."""
        c = self.cost()
        if c is None:
            return None
        return max(0, math.floor((self._room(slack) - c[0] - c[1] * num_decodes) / c[2]))

    def admits(self, num_running: int) -> bool:
        """Whether one more running request (one more decode row in every later step, beside the smallest
        prompt chunk) keeps the steps inside the target; True until measured."""
        c = self.cost()
        return c is None or c[0] + c[1] * (num_running + 1) + c[2] * self.min_chunk <= self._room()

    def describe(self) -> dict:
        c = self.cost()
        return {"target_ms": self.target_s * 1e3, "steps_observed": self.num_observed,
                "step_ms": None if c is None else round(c[0] * 1e3, 3),
                "decode_row_ms": None if c is None else round(c[1] * 1e3, 4),
                "prompt_token_ms": None if c is None else round(c[2] * 1e3, 4),
                "correction": round(self.correction, 4)}


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b (3 x 3, Gaussian elimination with partial pivoting); None when a is singular."""
    a = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-300:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, 3):
            k = a[r][col] / a[col][col]
            for j in range(col, 4):
                a[r][j] -= k * a[col][j]
    x = [0.0] * 3
    for i in (2, 1, 0):
        x[i] = (a[i][3] - sum(a[i][j] * x[j] for j in range(i + 1, 3))) / a[i][i]
    return x
