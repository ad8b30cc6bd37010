"""Settings of a function as a value: a frozen dataclass whose fields carry their help text
and a check of a given value, kept beside the function they configure (``TrainConfig``
beside ``rg.train``, ``SweepConfig`` beside ``rg.patching.sweep``, ...). The CLI's spec
sections are these classes.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Fit(Settings):
...     steps: int = option(10, "optimizer steps", number(1, integer=True))
>>> Fit.help("steps"), Fit.problem("steps", 0), Fit(steps=3).kwargs()
('optimizer steps', 'must be an int >= 1, got 0', {'steps': 3})
"""

from __future__ import annotations

import math
from dataclasses import asdict, field, fields

__all__ = ["Settings", "number", "one_of", "option"]


def option(default, help: str, check=None):
    """A settings field: its default, its help text and the check of a given value
    (``check(value)`` returns the problem as text, or None).

    >>> option(3, "passes over the data").metadata["help"]
    'passes over the data'
    """
    return field(default=default, metadata={"help": help, "check": check})


def number(low=None, high=None, integer=False, none_ok=False, low_open=False):
    """The check of a number: an int (or any real number) in a range, or None when ``none_ok``.

    >>> number(0, 1)(0.5), number(0, 1)(2), number(1, integer=True, none_ok=True)(None)
    (None, 'must be a number >= 0 and < 1, got 2', None)
    """
    kind = "an int" if integer else "a number"
    lo = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
    hi = "" if high is None else f" < {high}"
    wanted = f"{kind}{lo}{' and' if lo and hi else ''}{hi}" + (" or null" if none_ok else "")

    def check(v):
        if v is None and none_ok:
            return None
        ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
        if ok and not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        ok = ok and (low is None or (v > low if low_open else v >= low)) and (high is None or v < high)
        return None if ok else f"must be {wanted}, got {v!r}"

    return check


def one_of(*choices):
    """The check of a value that must be one of ``choices``.

    >>> one_of("left", "right")("up")
    "must be one of 'left', 'right', got 'up'"
    """
    return lambda v: None if isinstance(v, (str, bool, type(None))) and v in choices else (
        f"must be one of {', '.join(map(repr, choices))}, got {v!r}")


class Settings:
    """The base of a settings dataclass: help text, checks and keyword arguments per field.

    >>> from reftgraph.training import TrainConfig
    >>> TrainConfig.help("lr")
    'peak learning rate of AdamW (linear warm-up, then linear decay to zero)'
    """

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name``.

        >>> from reftgraph.training import TrainConfig
        >>> TrainConfig.help("epochs")
        'passes over the data'
        """
        return {f.name: f.metadata["help"] for f in fields(cls)}[name]

    @classmethod
    def problem(cls, name: str, value):
        """What is wrong with ``value`` for field ``name`` (text), or None.

        >>> from reftgraph.training import TrainConfig
        >>> TrainConfig.problem("batch_size", 0), TrainConfig.problem("batch_size", 4)
        ('must be an int >= 1, got 0', None)
        """
        check = {f.name: f.metadata["check"] for f in fields(cls)}[name]
        return check(value) if check is not None else None

    @classmethod
    def table(cls):
        """Every field with its default and help text, as a DataFrame (for a notebook).

        >>> from reftgraph.training import TrainConfig
        >>> TrainConfig.table().loc["epochs"].tolist()
        [3, 'passes over the data']
        """
        import pandas as pd

        return pd.DataFrame([{"setting": f.name, "default": f.default, "help": f.metadata["help"]}
                             for f in fields(cls)]).set_index("setting")

    def kwargs(self) -> dict:
        """The settings as keyword arguments of the function they configure.

        >>> from reftgraph.training import TrainConfig
        >>> TrainConfig(epochs=5).kwargs()["epochs"]
        5
        """
        return asdict(self)
