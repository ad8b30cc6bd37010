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

__all__ = ["caps", "ioi", "is_caps"]

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
