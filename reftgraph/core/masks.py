"""Reductions that count only the valid entries of a padded batch (e.g. positions a row has).

>>> import torch
>>> masked_mean(torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[True, True], [True, False]]), 1).tolist()
[2.0, 5.0]
"""

from __future__ import annotations

from typing import Sequence, Union

import torch


def masked_mean(x: torch.Tensor, valid: torch.Tensor, dims: Union[int, Sequence[int]]) -> torch.Tensor:
    """The mean of ``x`` over ``dims``, counting only the entries where ``valid`` is True.

    >>> import torch
    >>> x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [9.0, 90.0]], [[5.0, 50.0], [0.0, 0.0], [0.0, 0.0]]])
    >>> valid = torch.tensor([[True, True, False], [True, False, False]])     # [B=2, k=3] of x [2, 3, 2]
    >>> masked_mean(x, valid, 1).tolist()          # per row, over its valid positions
    [[2.0, 20.0], [5.0, 50.0]]
    >>> masked_mean(x, valid, (0, 1)).tolist()     # over rows and positions
    [3.0, 30.0]

    ``valid`` covers the leading dimensions of ``x`` (``[B, k]`` of ``[B, k, ...]``) and
    broadcasts over the rest; it is cast to ``x``'s dtype and device, and the sums are
    taken in that dtype. Where nothing is valid the mean is 0 (the count is clamped at 1).
    """
    w = valid.to(device=x.device, dtype=x.dtype)
    w = w.reshape(*w.shape, *([1] * (x.dim() - w.dim())))
    return (x * w).sum(dims) / w.sum(dims).clamp(min=1)
