"""A seeded set of checkable tasks (arithmetic, copying a word) for measuring routers: every answer can be
checked exactly, so accuracy needs no judge model."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_WORDS = ("river", "lantern", "copper", "meadow", "falcon", "harbor", "velvet", "glacier", "orchid", "timber")


@dataclass(frozen=True)
class Task:
    kind: str
    question: str
    answer: str

    def check(self, text: str) -> bool:
        if self.kind == "copy":
            words = re.findall(r"[A-Za-z]+", text)
            return bool(words) and words[0].lower() == self.answer
        numbers = re.findall(r"-?\d+", text)   # the last number: "3 + 7 = 10" and "The answer is 10." both count
        return bool(numbers) and numbers[-1] == self.answer


def make_tasks(n: int, seed: int = 0) -> list[Task]:
    """n tasks, in equal shares of one-digit sums, two-digit sums, one-digit products and word copies."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = ("add1", "add2", "mul1", "copy")[i % 4]
        if kind == "copy":
            w = rng.choice(_WORDS)
            tasks.append(Task(kind, f"Repeat this word exactly, nothing else: {w}", w))
            continue
        lo, hi = (10, 99) if kind == "add2" else (2, 9)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op, value = ("*", a * b) if kind == "mul1" else ("+", a + b)
        tasks.append(Task(kind, f"What is {a} {op} {b}? Reply with the number only.", str(value)))
    return tasks


# Worked examples for a few-shot prompt (the "big" configuration of the benchmark's stand-in).
FEW_SHOT = [("What is 3 + 4? Reply with the number only.", "7"),
            ("What is 6 * 7? Reply with the number only.", "42"),
            ("Repeat this word exactly, nothing else: pebble", "pebble")]
