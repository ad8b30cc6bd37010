"""Losses for the training loop: next-token cross-entropy and the KL to the unedited model.

>>> import torch
>>> float(lm_loss(torch.zeros(1, 2, 4), torch.tensor([[-100, 1]])))  # uniform over 4 tokens: log 4
1.3862943649291992
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

__all__ = ["case_groups", "kl_to_base", "lm_loss"]


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


def _grouped_log_probs(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    probs = logits.float().softmax(-1)
    summed = probs.new_zeros(probs.shape[0], int(groups.max()) + 1).index_add_(1, groups.to(probs.device), probs)
    return summed.clamp_min(torch.finfo(summed.dtype).tiny).log()


def kl_to_base(edited: torch.Tensor, base: torch.Tensor, groups: Optional[torch.Tensor] = None,
               reduction: str = "mean") -> torch.Tensor:
    """KL(base || edited) of next-token distributions, ``[positions, vocab]`` logits each.

    >>> base = torch.tensor([[2.0, 0.0, 0.0]])
    >>> float(kl_to_base(base.clone(), base))                       # the same distribution
    0.0
    >>> round(float(kl_to_base(torch.zeros(1, 3), base)), 4)        # uniform against peaked
    0.433

    ``groups`` (one group id per token, e.g. :func:`case_groups`) sums the probabilities
    within each group first, so moving mass between tokens of one group costs nothing:

    >>> swapped = torch.tensor([[0.0, 2.0, 0.0]])                   # token 0's mass on token 1
    >>> float(kl_to_base(swapped, base, groups=torch.tensor([0, 0, 1])))
    0.0

    ``reduction``: ``"mean"`` over positions (0 without any), or ``"sum"``.
    """
    if groups is None:
        log_edited, log_base = edited.float().log_softmax(-1), base.float().log_softmax(-1)
    else:
        log_edited, log_base = _grouped_log_probs(edited, groups), _grouped_log_probs(base, groups)
    total = (log_base.exp() * (log_base - log_edited)).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / max(1, edited.shape[0])


def case_groups(tokenizer, vocab_size: Optional[int] = None) -> torch.Tensor:
    """One group id per token: tokens whose text is the same after lower-casing share one.

    >>> import reftgraph as rg
    >>> tok = rg.models.tiny("llama").tokenizer
    >>> groups = case_groups(tok)
    >>> a, A = tok.convert_tokens_to_ids(["a", "A"])
    >>> bool(groups[a] == groups[A]), len(groups) == len(tok)
    (True, True)

    With it, :func:`kl_to_base` compares what is said, not its case ("Paris", "paris" and
    "PARIS" are one outcome when each is one token). Tokens that decode to part of a
    character keep a group of their own; ids from ``len(tokenizer)`` to ``vocab_size``
    (a model's padded vocabulary) too."""
    return _case_groups(tokenizer, len(tokenizer), vocab_size or len(tokenizer)).clone()


@lru_cache(maxsize=8)
def _case_groups(tokenizer, n_tokens: int, vocab_size: int) -> torch.Tensor:
    texts = tokenizer.batch_decode([[i] for i in range(n_tokens)])
    keys: dict = {}
    ids = [keys.setdefault(("own", i) if "\ufffd" in text else text.lower(), len(keys))
           for i, text in enumerate(texts)]
    ids += [len(keys) + j for j in range(max(0, vocab_size - n_tokens))]
    return torch.tensor(ids[:vocab_size])
