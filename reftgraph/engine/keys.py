"""Key axes counted from each row's first prompt token (``attn_pattern``'s last axis).

>>> import torch
>>> order = KeyOrder(start=torch.tensor([0, 2]), length=torch.tensor([3, 1]), width=3)
>>> p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])    # row 1 is left-padded by two tokens
>>> order.to_prompt(p).tolist()                              # its one real key comes first
[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]
>>> torch.equal(order.from_prompt(order.to_prompt(p), order.to_prompt(p)), p)
True

In the model a key's index is its padded position, so the same prompt token sits at
another index under left padding. A site sees keys in prompt order instead: key ``j`` of row
``b`` is its ``j``-th prompt token (then the tokens generated after the prompt), whatever the
padding side, so that an edit, a patch between streams or a collected pattern means the
same thing on both sides. Per row the order is a rotation of the padded axis, so it is
undone exactly; the keys past a row's own tokens (padding) are handed to the op but what
it writes there is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["KeyOrder"]


@dataclass(frozen=True)
class KeyOrder:
    """Each row's first prompt token (``start``), prompt length and the padded ``width``.

    >>> KeyOrder(torch.tensor([1]), torch.tensor([2]), width=3).to_prompt(torch.tensor([[0.0, 0.3, 0.7]]))
    tensor([[0.3000, 0.7000, 0.0000]])

    ``start`` is a padded index; keys beyond ``width`` are tokens generated after the prompt.
    """

    start: torch.Tensor
    length: torch.Tensor
    width: int
    picked: Optional[torch.Tensor] = None        # [B, m]: the keys a site's ``keys=`` selects (prompt order)
    picked_valid: Optional[torch.Tensor] = None  # [B, m]: False where a row has fewer

    def _index(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` shaped like ``value`` ``[B, ..., K]``."""
        n_keys = value.shape[-1]
        j = torch.arange(n_keys, device=value.device)
        start, length = self.start.to(value.device), self.length.to(value.device)
        index = (start[:, None] + j) % n_keys                          # [B, K]: a rotation per row
        valid = j < (length + (n_keys - self.width))[:, None]          # the row's own tokens
        shape = (value.shape[0],) + (1,) * (value.dim() - 2) + (n_keys,)
        return index.view(shape).expand_as(value), valid.view(shape).expand_as(value)

    def to_prompt(self, value: torch.Tensor) -> torch.Tensor:
        """``value[B, ..., K]`` with its last axis in prompt order.

        >>> KeyOrder(torch.tensor([2]), torch.tensor([1]), width=3).to_prompt(torch.tensor([[5.0, 6.0, 7.0]]))
        tensor([[7., 5., 6.]])
        """
        return value.gather(-1, self._index(value)[0])

    def from_prompt(self, new: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """``new`` (prompt order) back in padded order; keys that are no token of the row keep
        their value in ``before`` (the value before the edit, in prompt order too).

        >>> order, before = KeyOrder(torch.tensor([2]), torch.tensor([1]), width=3), torch.tensor([[7.0, 5.0, 6.0]])
        >>> order.from_prompt(torch.tensor([[9.0, 9.0, 9.0]]), before)      # only the row's one token changes
        tensor([[5., 6., 9.]])
        """
        index, valid = self._index(new)
        kept = torch.where(valid, new, before)
        return torch.empty_like(kept).scatter(-1, index, kept)

    def pick(self, value: torch.Tensor) -> torch.Tensor:
        """The selected keys of ``value[B, ..., K]`` (prompt order): ``[B, ..., m]``, zero
        where a row has fewer; the whole axis without a selection.

        >>> order = KeyOrder(torch.tensor([0]), torch.tensor([3]), 3, torch.tensor([[2, 0]]), torch.ones(1, 2).bool())
        >>> order.pick(torch.tensor([[5.0, 6.0, 7.0]]))
        tensor([[7., 5.]])
        """
        if self.picked is None:
            return value
        return value.gather(-1, self._expand(self.picked, value)) * self._expand(self.picked_valid, value)

    def unpick(self, new: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``value`` (prompt order) with its selected keys replaced by ``new`` (:meth:`pick`'s shape).

        >>> order = KeyOrder(torch.tensor([0]), torch.tensor([3]), 3, torch.tensor([[2, 0]]), torch.ones(1, 2).bool())
        >>> order.unpick(torch.tensor([[1.0, 2.0]]), torch.tensor([[5.0, 6.0, 7.0]]))
        tensor([[2., 6., 1.]])
        """
        if self.picked is None:
            return new
        n_keys = value.shape[-1]
        onehot = torch.nn.functional.one_hot(self.picked.to(value.device), n_keys).to(value.dtype)
        onehot = onehot * self.picked_valid.to(device=value.device, dtype=value.dtype)[..., None]   # [B, m, K]
        shape = (value.shape[0],) + (1,) * (value.dim() - 2) + tuple(onehot.shape[1:])
        onehot = onehot.view(shape)
        written = (new.unsqueeze(-1) * onehot).sum(-2)
        return value * (1 - onehot.sum(-2)) + written

    @staticmethod
    def _expand(index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        index = index.to(value.device)
        shape = (value.shape[0],) + (1,) * (value.dim() - 2) + (index.shape[-1],)
        return index.view(shape).expand(*value.shape[:-1], index.shape[-1]).to(
            value.dtype if index.dtype == torch.bool else index.dtype)
