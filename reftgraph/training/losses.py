"""Losses for the training loop.

>>> import torch
>>> float(lm_loss(torch.zeros(1, 2, 4), torch.tensor([[-100, 1]])))  # uniform over 4 tokens: log 4
1.3862943649291992
"""

from __future__ import annotations

import torch


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, head=None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (response) tokens.

    >>> import math
    >>> logits = torch.zeros(1, 3, 5)            # uniform over 5 tokens
    >>> labels = torch.tensor([[-100, 2, 4]])    # the response: tokens 1 and 2
    >>> math.isclose(lm_loss(logits, labels), math.log(5), rel_tol=1e-6)
    True

    With ``head`` (the model's output embedding), ``logits`` are final hidden states and
    the head runs on the labelled positions only."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != -100
    scores = logits[:, :-1][keep]
    if head is not None:
        scores = head(scores)
    return torch.nn.functional.cross_entropy(scores.float(), targets[keep])
