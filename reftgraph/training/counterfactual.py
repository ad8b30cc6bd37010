"""Counterfactual datasets: rows of a base prompt, source prompts and the answer tokens a
metric compares (the data of patching, DAS and circuits).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = Counterfactual(["ab c", "xy z"], ["ab d", "xy w"], correct=["c", "z"], wrong=["d", "w"])
>>> len(data), data.answer_ids(lm)[0].tolist()
(2, [69, 92])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import DataError


def _strings(values, what: str, n: Optional[int] = None) -> list:
    values = [values] if isinstance(values, str) else list(values)
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{what} must be a non-empty list of strings")
    if n is not None and len(values) != n:
        raise DataError(f"{what} has {len(values)} rows, the base prompts {n}: give one per row")
    return values


@dataclass
class Counterfactual:
    """Rows of (base prompt, source prompt(s), answer tokens).

    >>> data = Counterfactual(["Paris is in", "Rome is in"], {"s1": ["Berlin is in", "Oslo is in"]},
    ...                       correct=[" Germany", " Norway"], wrong=[" France", " Italy"])
    >>> len(data), list(data.sources), data.source
    (2, ['s1'], ['Berlin is in', 'Oslo is in'])

    ``base`` is what patches write into, ``sources`` what they read from: one list (the
    stream ``"source"``) or ``{stream: prompts}``. ``correct`` / ``wrong`` are the answer
    strings a metric compares (each must be one token, e.g. ``" Mary"`` with its space).
    For denoising (activation patching), base = corrupted and source = clean prompts.
    """

    base: Sequence[str]
    sources: object
    correct: Optional[Sequence[str]] = None
    wrong: Optional[Sequence[str]] = None
    meta: list = field(default_factory=list)

    def __post_init__(self):
        self.base = _strings(self.base, "base prompts")
        n = len(self.base)
        sources = self.sources if isinstance(self.sources, dict) else {"source": self.sources}
        if not sources:
            raise DataError("a counterfactual dataset needs at least one source stream")
        self.sources = {name: _strings(p, f"sources[{name!r}]", n) for name, p in sources.items()}
        if "base" in self.sources:
            raise DataError("'base' names the base prompts; call the source stream something else")
        if self.correct is not None:
            self.correct = _strings(self.correct, "correct answers", n)
        if self.wrong is not None:
            self.wrong = _strings(self.wrong, "wrong answers", n)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def source(self) -> list:
        """The prompts of the stream ``"source"`` (or of the only source stream).

        >>> Counterfactual(["a", "b"], {"source": ["c", "d"], "s2": ["e", "f"]}).source
        ['c', 'd']
        """
        if "source" in self.sources:
            return self.sources["source"]
        if len(self.sources) == 1:
            return next(iter(self.sources.values()))
        raise DataError(f"several source streams {sorted(self.sources)}; pick one by name")

    def rows(self, index) -> "Counterfactual":
        """A subset of rows (a slice or a list of row numbers).

        >>> data = Counterfactual(["a", "b", "c"], ["x", "y", "z"], correct=["1", "2", "3"])
        >>> part = data.rows([2, 0])
        >>> part.base, part.source, part.correct
        (['c', 'a'], ['z', 'x'], ['3', '1'])
        """
        pick = (lambda xs: xs[index]) if isinstance(index, slice) else (lambda xs: [xs[i] for i in index])
        return Counterfactual(pick(self.base), {k: pick(v) for k, v in self.sources.items()},
                              None if self.correct is None else pick(self.correct),
                              None if self.wrong is None else pick(self.wrong),
                              pick(self.meta) if self.meta else [])

    def swap(self) -> "Counterfactual":
        """Base and source exchanged (one source stream); the answers stay.

        >>> swapped = Counterfactual(["clean"], ["corrupt"], correct=[" A"]).swap()
        >>> swapped.base, swapped.source, swapped.correct
        (['corrupt'], ['clean'], [' A'])
        """
        return Counterfactual(self.source, self.base, self.correct, self.wrong, self.meta)

    def answer_ids(self, model, *, required: bool = True) -> tuple:
        """``(correct [B], wrong [B] or None)`` token ids; each answer must be one token.

        >>> import reftgraph as rg
        >>> data = Counterfactual(["a", "b"], ["c", "d"], correct=["x", "y"])
        >>> correct, wrong = data.answer_ids(rg.models.tiny("llama"))
        >>> correct.tolist(), wrong
        ([90, 91], None)
        >>> Counterfactual(["a"], ["c"]).answer_ids(rg.models.tiny("llama"), required=False)
        (None, None)

        Without answers it raises a DataError, or with ``required=False`` returns
        ``(None, None)`` (for metrics that need no answers; those that do then say so).
        """
        if self.correct is None:
            if not required:
                return None, None
            raise DataError("this metric needs answers: Counterfactual(..., correct=[...])")
        return (_one_token(model.tokenizer, self.correct, "correct"),
                None if self.wrong is None else _one_token(model.tokenizer, self.wrong, "wrong"))


def _one_token(tokenizer, answers: Sequence[str], what: str) -> torch.Tensor:
    ids = []
    for i, answer in enumerate(answers):
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise DataError(f"{what} answer {answer!r} of row {i} is {len(tokens)} tokens {tokens}; "
                            "metrics compare single tokens (mind the leading space, e.g. ' Mary')")
        ids.append(tokens[0])
    return torch.tensor(ids)
