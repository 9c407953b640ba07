"""Final answers from sample texts, their vote, and how sure the vote is."""
from __future__ import annotations

import math
import re
from collections import Counter


def extract_answer(text: str, pattern: re.Pattern | None) -> str | None:
    """The last match of the pattern (its first group when it has one), stripped; None when nothing matches.
    Without a pattern the whole stripped text is the answer."""
    if pattern is None:
        return text.strip() or None
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    answer = last.group(1) if pattern.groups else last.group(0)
    return None if answer is None else answer.strip()


def majority(answers: list[str | None]) -> tuple[str | None, Counter]:
    """The most common answer (the earliest drawn among ties; None answers never win) and the counts."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, counts
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top), counts


def leader_posterior(counts: Counter) -> float:
    """P(the leading answer is more likely than the runner-up | the counts), under a uniform Beta prior over
    their two shares (the stopping rule of Aggarwal et al.'s Adaptive-Consistency): with a = c1 + 1 and
    b = c2 + 1, P(Beta(a, b) > 1/2) = P(Binomial(c1 + c2 + 1, 1/2) <= c1)."""
    if not counts:
        return 0.0
    ranked = sorted(counts.values(), reverse=True) + [0]
    c1, c2 = ranked[0], ranked[1]
    n = c1 + c2 + 1
    return sum(math.comb(n, k) for k in range(c1 + 1)) / 2 ** n
