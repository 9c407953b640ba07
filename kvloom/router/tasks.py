"""A seeded set of checkable tasks (arithmetic, copying a word, naming a capital) for measuring routers: every
answer can be checked exactly, so accuracy needs no judge model."""
from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass

_WORDS = ("river", "lantern", "copper", "meadow", "falcon", "harbor", "velvet", "glacier", "orchid", "timber")
# Countries whose capital is one undisputed name, from well known to obscure: a kind that asks for knowledge.
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Turkey": "Ankara", "Greece": "Athens", "Portugal": "Lisbon", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Switzerland": "Bern", "Belgium": "Brussels", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana",
    "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Mongolia": "Ulaanbaatar", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Malaysia": "Kuala Lumpur", "Iceland": "Reykjavik", "Uruguay": "Montevideo",
    "Laos": "Vientiane", "Cambodia": "Phnom Penh", "Senegal": "Dakar", "Uganda": "Kampala", "Zimbabwe": "Harare",
    "Zambia": "Lusaka", "Angola": "Luanda", "Algeria": "Algiers", "Tunisia": "Tunis", "Syria": "Damascus",
    "Jordan": "Amman", "Lebanon": "Beirut", "Afghanistan": "Kabul", "Qatar": "Doha", "Armenia": "Yerevan",
    "Azerbaijan": "Baku", "Latvia": "Riga", "Lithuania": "Vilnius", "Estonia": "Tallinn", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Albania": "Tirana", "Paraguay": "Asuncion", "Ecuador": "Quito",
    "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Madagascar": "Antananarivo", "Mozambique": "Maputo",
    "Namibia": "Windhoek", "Botswana": "Gaborone", "Rwanda": "Kigali", "Sudan": "Khartoum", "Somalia": "Mogadishu",
    "Mali": "Bamako", "Niger": "Niamey"}
KINDS = ("add1", "add2", "mul1", "copy")           # make_tasks' default: the stand-in run's task set
ALL_KINDS = (*KINDS, "capital")


def _plain(text: str) -> str:
    """Lower case without accents: "Bogotá" and "bogota" are the same answer."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()


@dataclass(frozen=True)
class Task:
    kind: str
    question: str
    answer: str

    def check(self, text: str) -> bool:
        if self.kind == "capital":
            # Named as a whole word anywhere: "Paris" and "The capital is Paris." count; "Tunisia" is not "Tunis".
            return re.search(rf"\b{re.escape(_plain(self.answer))}\b", _plain(text)) is not None
        if self.kind == "copy":
            words = re.findall(r"[A-Za-z]+", text)
            return bool(words) and words[0].lower() == self.answer
        numbers = re.findall(r"-?\d+", text)   # the last number: "3 + 7 = 10" and "The answer is 10." both count
        return bool(numbers) and numbers[-1] == self.answer


def make_tasks(n: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """n tasks, the kinds in turn (by default one-digit sums, two-digit sums, one-digit products and word copies;
    "capital" asks for a country's capital), drawn from random.Random(seed)."""
    if unknown := set(kinds) - set(ALL_KINDS):
        raise ValueError(f"unknown task kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "capital":
            country = rng.choice(sorted(_CAPITALS))
            tasks.append(Task(kind, f"What is the capital of {country}?", _CAPITALS[country]))
            continue
        if kind == "copy":
            w = rng.choice(_WORDS)
            tasks.append(Task(kind, f"Repeat this word exactly, nothing else: {w}", w))
            continue
        lo, hi = (10, 99) if kind == "add2" else (2, 9)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op, value = ("*", a * b) if kind == "mul1" else ("+", a + b)
        tasks.append(Task(kind, f"What is {a} {op} {b}? Reply with the number only.", str(value)))
    return tasks


# Worked examples for a few-shot chat (the "big" configuration of the benchmark's stand-in).
FEW_SHOT = [("What is 3 + 4? Reply with the number only.", "7"),
            ("What is 6 * 7? Reply with the number only.", "42"),
            ("Repeat this word exactly, nothing else: pebble", "pebble")]
# Worked examples of the plain prompt: the sums written out ("3 + 4 = 7"; the checker reads the last number),
# which both real models answer far better than a bare number (a 24-task pilot on another seed), and capitals
# answered in a sentence.
PLAIN_SHOTS = [("What is 3 + 4? Reply with the number only.", "3 + 4 = 7"),
               ("What is the capital of Italy?", "The capital of Italy is Rome."),
               ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London."),
               ("What is 6 * 7? Reply with the number only.", "6 * 7 = 42"),
               ("Repeat this word exactly, nothing else: pebble", "pebble")]


def few_shot_prompt(question: str) -> str:
    """A plain-text prompt, PLAIN_SHOTS then the question, for any model, chat-tuned or not (a base model's GGUF
    has no chat template): the answer follows "A:" and ends at the line's end (stop at "\n")."""
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in PLAIN_SHOTS)
    return f"{shots}Q: {question}\nA:"
