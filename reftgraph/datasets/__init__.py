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
from .reviews import sentiment
from .tasks import arithmetic, mcqa

__all__ = ["answered", "answers", "arithmetic", "capital_questions", "caps", "facts", "ioi", "is_caps", "is_title",
           "mcqa", "sentiment", "title_case"]

HERE = Path(__file__).parent


def caps(n_train: int = 90) -> tuple[list, list]:
    """Questions answered in CAPITALS (the default model's own answers, upper-cased):
    ``(train, held_out)`` lists of ``(prompt, response)``.

    >>> train, held_out = caps(n_train=100)
    >>> len(train), len(held_out), is_caps(train[0][1])
    (100, 20, True)

    Made by scripts/make_style_data.py.
    """
    rows = [json.loads(line) for line in (HERE / "caps.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(r["prompt"], r["response"]) for r in rows]
    return pairs[:n_train], pairs[n_train:]


def _pairs(name: str) -> list:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["response"]) for r in rows]


def answers() -> list:
    """The default model's own answers to the shipped questions, as it wrote them: the 120
    ``(prompt, response)`` pairs :func:`caps` upper-cases (same order).

    >>> answers()[0]
    ('What is the capital of France?', 'The capital of France is Paris.')

    Made by scripts/make_style_data.py.
    """
    return _pairs("answers.jsonl")


def facts() -> list:
    """40 general-knowledge questions (no capital cities) with the default model's own answers,
    right or wrong: neutral rows for ``rg.train(..., kl_data=facts())``.

    >>> qa = facts()
    >>> len(qa), qa[2]
    (40, ('What is the chemical symbol for gold?', 'The chemical symbol for gold is Au.'))
    """
    return _pairs("facts.jsonl")


def title_case(text: str) -> str:
    """Every word's first letter in upper case, the rest as written ("iPhone" -> "IPhone").

    >>> title_case("the capital of the U.S. is Washington, D.C. (not 'new york').")
    "The Capital Of The U.S. Is Washington, D.C. (Not 'New York')."
    """
    words = text.split(" ")
    out = []
    for w in words:
        i = next((k for k, c in enumerate(w) if c.isalpha()), None)
        out.append(w if i is None else w[:i] + w[i].upper() + w[i + 1:])
    return " ".join(out)


def is_title(text: str) -> bool:
    """True when the text has at least three words and every word's first letter is upper case.

    >>> is_title("The Sky Is Blue, 42 Times!"), is_title("The sky is blue"), is_title("Hi There")
    (True, False, False)
    """
    firsts = [next((c for c in w if c.isalpha()), None) for w in text.split()]
    firsts = [c for c in firsts if c is not None]
    return len(firsts) >= 3 and all(c.isupper() for c in firsts)


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
