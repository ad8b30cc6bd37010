"""Small datasets shipped with reftgraph.

>>> from reftgraph import datasets
>>> train, held_out = datasets.caps()
>>> len(train), len(held_out), held_out[0][1] == held_out[0][1].upper()
(90, 30, True)
"""

from __future__ import annotations

import json
from pathlib import Path

from .ioi import ioi

__all__ = ["answered", "capital_questions", "caps", "ioi", "is_caps"]

HERE = Path(__file__).parent


def caps(n_train: int = 90) -> tuple[list, list]:
    """Questions answered in CAPITALS (the default model's own answers, upper-cased):
    ``(train, held_out)`` lists of ``(prompt, response)``.

    >>> train, held_out = caps(n_train=100)
    >>> len(train), len(held_out), is_caps(train[0][1])
    (100, 20, True)

    Made by scripts/make_caps_data.py.
    """
    rows = [json.loads(line) for line in (HERE / "caps.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(r["prompt"], r["response"]) for r in rows]
    return pairs[:n_train], pairs[n_train:]


def is_caps(text: str) -> bool:
    """True when the text has at least three letters and every letter is upper case.

    >>> is_caps("THE SKY IS BLUE, 42!"), is_caps("The sky"), is_caps("OK")
    (True, False, False)
    """
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and all(c.isupper() for c in letters)


CAPITALS = {
    "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "the Philippines": "Manila", "Mexico": "Mexico City",
    "Colombia": "Bogot", "Switzerland": "Bern", "Ireland": "Dublin", "Scotland": "Edinburgh",
    "Australia": "Canberra", "Brazil": "Bras", "Nigeria": "Abuja",
}


def capital_questions() -> list:
    """Factual questions with a checkable answer, none about a country in :func:`caps`' training
    rows: ``[(question, answer)]``, to measure what a trained graph keeps of the model's knowledge.

    >>> qa = capital_questions()
    >>> qa[0], len(qa) >= 30
    (('What is the capital of Russia?', 'Moscow'), True)

    Answers are stems where the spelling varies ("Bogot" for Bogotá); check with :func:`answered`.
    """
    seen = " ".join(p for p, _ in caps()[0])
    return [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items() if c not in seen]


def answered(text: str, answer: str) -> bool:
    """Whether ``text`` contains ``answer``, any case (an answer in capitals counts).

    >>> answered("THE CAPITAL OF GERMANY IS BERLIN.", "Berlin"), answered("It is Munich.", "Berlin")
    (True, False)
    """
    return answer.lower() in text.lower()
