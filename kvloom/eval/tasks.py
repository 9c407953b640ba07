"""A checkable task set for inference-time scaling: small arithmetic and counting tasks with exact integer
answers, generated from a seed (the same seed, the same items). Every answer is an integer, so one extractor
(the last integer of the text) reads every sample, and a sample is correct when it equals the answer."""
from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_REGEX = r"(-?\d+)"       # the last integer of a sample's text is its answer
_WORDS = ("apple banana cherry garden window pencil rabbit yellow summer orange silver planet bottle "
          "monkey castle dragon forest guitar island jacket kitten lemon market number pocket river "
          "spider tomato violin wizard").split()


@dataclass(frozen=True)
class Task:
    kind: str
    question: str
    answer: str


def _add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", a + b


def _sub(rng):
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return f"What is {a} - {b}?", a - b


def _mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    return f"What is {a} times {b}?", a * b


def _letters(rng):
    w = rng.choice(_WORDS)
    return f"How many letters are in the word \"{w}\"?", len(w)


def _count_letter(rng):
    w = rng.choice(_WORDS)
    c = rng.choice(sorted(set(w)))
    return f"How many times does the letter \"{c}\" appear in the word \"{w}\"?", w.count(c)


def _alphabet(rng):
    c = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"What is the position of the letter \"{c}\" in the English alphabet?", ord(c) - 96


KINDS = {"add": _add, "sub": _sub, "mul": _mul, "letters": _letters, "count_letter": _count_letter,
         "alphabet": _alphabet}


def make_tasks(num_items: int, seed: int = 0) -> list[Task]:
    """num_items tasks, the kinds in turn, drawn from random.Random(seed)."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    tasks = []
    for i in range(num_items):
        kind = kinds[i % len(kinds)]
        question, answer = KINDS[kind](rng)
        tasks.append(Task(kind, question, str(answer)))
    return tasks


def chat_messages(task: Task) -> list[dict]:
    return [{"role": "system", "content": "You answer with a single number."},
            {"role": "user", "content": task.question}]
