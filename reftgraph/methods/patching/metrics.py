"""Metrics on next-token logits, per row, and normalised restoration.

A metric is called as ``metric(logits, ref)`` with ``logits [B, vocab]`` (the next token
after each base prompt) and a :class:`Reference` (answer ids and the source run's logits);
it returns one value per row.

>>> import torch
>>> ref = Reference(correct=torch.tensor([0]), wrong=torch.tensor([1]))
>>> logit_diff(torch.tensor([[3.0, 1.0, 0.0]]), ref).tolist()
[2.0]
>>> restoration(patched=1.5, base=1.0, source=3.0)
0.25
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...errors import DataError


@dataclass
class Reference:
    """What metrics compare against: answer token ids ``[B]`` and the source run's logits.

    >>> ref = Reference(correct=torch.tensor([2, 0]), wrong=torch.tensor([1, 1]))
    >>> prob(torch.zeros(2, 4), ref).tolist()       # uniform logits over 4 tokens
    [0.25, 0.25]
    """

    correct: Optional[torch.Tensor] = None
    wrong: Optional[torch.Tensor] = None
    source_logits: Optional[torch.Tensor] = None

    def repeat(self, n: int) -> "Reference":
        """Each row repeated ``n`` times in a row (rows ordered ``(row, condition)``).

        >>> Reference(correct=torch.tensor([7, 8])).repeat(3).correct.tolist()
        [7, 7, 7, 8, 8, 8]
        """
        rep = (lambda t: None if t is None else t.repeat_interleave(n, 0))
        return Reference(rep(self.correct), rep(self.wrong), rep(self.source_logits))


def _token(logits: torch.Tensor, ids: Optional[torch.Tensor], what: str) -> torch.Tensor:
    if ids is None:
        raise DataError(f"this metric needs {what} answers: Counterfactual(..., {what}=[...])")
    return logits.gather(1, ids.to(logits.device)[:, None])[:, 0]


def logit_diff(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """``logit[correct] - logit[wrong]`` per row.

    >>> ref = Reference(correct=torch.tensor([0, 0]), wrong=torch.tensor([1, 2]))
    >>> logit_diff(torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), ref).tolist()
    [2.0, -2.0]
    """
    return _token(logits, ref.correct, "correct") - _token(logits, ref.wrong, "wrong")


def prob(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """The probability of the correct token.

    >>> prob(torch.tensor([[0.0, 0.0], [10.0, -10.0]]), Reference(correct=torch.tensor([1, 0]))).tolist()
    [0.5, 1.0]
    """
    return _token(logits.float().softmax(-1), ref.correct, "correct")


def loss(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Cross-entropy of the correct token (nats).

    >>> import math
    >>> math.isclose(loss(torch.zeros(1, 4), Reference(correct=torch.tensor([3]))).item(), math.log(4), rel_tol=1e-6)
    True
    """
    return -_token(logits.float().log_softmax(-1), ref.correct, "correct")


def kl(logits: torch.Tensor, ref: Reference) -> torch.Tensor:
    """``KL(source run || this run)`` of the next-token distributions (nats).

    >>> ref = Reference(source_logits=torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    >>> [round(v, 4) for v in kl(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), ref).tolist()]   # same, then swapped
    [0.0, 0.4621]
    """
    if ref.source_logits is None:
        raise DataError("kl needs the source run's logits")
    p = ref.source_logits.to(logits.device).float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


METRICS = {"logit_diff": logit_diff, "prob": prob, "loss": loss, "kl": kl}
Metric = Union[str, Callable]


def get_metric(metric: Metric) -> tuple[str, Callable]:
    """``(name, function)`` for a metric name or a callable ``f(logits, ref) -> [B]``.

    >>> def top(logits, ref):
    ...     return logits.max(-1).values
    >>> get_metric("prob")[0], get_metric(top)[0], get_metric("kl")[1] is kl
    ('prob', 'top', True)
    """
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in METRICS:
        raise DataError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)} or a function "
                        "f(logits, ref) -> one value per row")
    return metric, METRICS[metric]


def restoration(patched, base, source):
    """Normalised restoration ``(patched - base) / (source - base)``: 0 = the base run's
    value, 1 = the source run's.

    >>> restoration(patched=torch.tensor([-1.0, 0.5, 2.0]), base=-1.0, source=2.0).tolist()
    [0.0, 0.5, 1.0]

    In denoising the base run is the corrupted one.
    """
    return (patched - base) / (source - base)
