"""What a style is, and the recorded forward of one block that styles are checked against.

>>> import torch
>>> r = Record(pre=torch.ones(2), post=torch.ones(2) * 3)
>>> r.close(r.pre * 3, r.post)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

__all__ = ["Record", "Style", "Found"]


@dataclass
class Record:
    """One block's forward: its input and output, and the first input and output of every
    module in it (by path from the block), in call order.

    >>> import torch
    >>> Record(pre=torch.zeros(1), post=torch.zeros(1)).out("attn") is None
    True
    """

    pre: torch.Tensor
    post: torch.Tensor
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)   # the plain numbers the block holds (styles.scaled)
    attention: frozenset = frozenset()      # the block's attention children: never the norm before the MLP
    nested_norms: frozenset = frozenset()   # norms below the block's children (DBRX's norm_attn_norm.norm_2)

    def out(self, path: Optional[str]) -> Optional[torch.Tensor]:
        """The first output of the module at ``path`` (None when it did not run).

        >>> import torch
        >>> Record(torch.zeros(1), torch.zeros(1), outputs={"mlp": torch.ones(1)}).out("mlp").tolist()
        [1.0]
        """
        return self.outputs.get(path) if path else None

    def inp(self, path: Optional[str]) -> Optional[torch.Tensor]:
        """The first input of the module at ``path`` (None when it did not run).

        >>> import torch
        >>> Record(torch.zeros(1), torch.zeros(1), inputs={"mlp": torch.ones(1)}).inp("mlp").tolist()
        [1.0]
        """
        return self.inputs.get(path) if path else None

    @staticmethod
    def close(a, b) -> bool:
        """Whether two tensors agree to float32 rounding (relative to their scale).

        >>> import torch
        >>> Record.close(torch.ones(3), torch.ones(3) + 1e-7), Record.close(torch.ones(3), None)
        (True, False)
        """
        if a is None or b is None or a.numel() != b.numel():
            return False
        a = a.reshape(b.shape)   # some blocks flatten tokens inside a sub-layer (OPT's MLP)
        return bool(((a - b).abs().max() <= 1e-4 * (1 + b.abs().max())).item())

    @staticmethod
    def gap(a, b) -> str:
        """How far apart two tensors are, for error messages.

        >>> import torch
        >>> Record.gap(torch.zeros(2), torch.ones(2))
        'max |difference| 1'
        """
        if a is None or b is None:
            return "a value is missing"
        if a.numel() != b.numel():
            return f"shapes {list(a.shape)} and {list(b.shape)} differ"
        return f"max |difference| {(a.reshape(b.shape) - b).abs().max().item():.3g}"

    def mid(self, mlp: Optional[str]) -> Optional[torch.Tensor]:
        """The stream the MLP reads: the input of the norm that feeds the MLP, else the MLP's input.

        >>> import torch
        >>> x = torch.ones(1)
        >>> Record(x, x, inputs={"ln_2": x * 5, "mlp": x * 2}, outputs={"ln_2": x * 2}).mid("mlp").tolist()
        [5.0]

        The norm is one of the block's children, or a norm below them (DBRX's
        ``norm_attn_norm.norm_2``); an attention child is none (one that adds its own residual
        returns what the MLP reads: RoBERTa-PreLayerNorm's).
        """
        return self.inp(self.mid_path(mlp))

    def mid_path(self, mlp: Optional[str]) -> Optional[str]:
        """The module whose input is :meth:`mid`: the norm that feeds the MLP, else the MLP.

        >>> import torch
        >>> x = torch.ones(1)
        >>> Record(x, x, inputs={"ln_2": x * 5, "mlp": x * 2}, outputs={"ln_2": x * 2}).mid_path("mlp")
        'ln_2'
        """
        fed = self.inp(mlp)
        if fed is None:
            return None
        for path, out in self.outputs.items():
            child = "." not in path and path not in self.attention
            if path not in (mlp, "") and (child or path in self.nested_norms) and self.close(out, fed):
                return path
        return mlp

    def beside(self, mlp: Optional[str]) -> list:
        """The block's other children that read what ``mlp`` reads and give its output's shape:
        modules whose output the block may add together with the MLP's (GraniteMoeHybrid's
        shared MLP beside its mixture of experts).

        >>> import torch
        >>> x = torch.ones(1, 2)
        >>> Record(x, x, inputs={"moe": x, "shared": x}, outputs={"moe": x, "shared": x * 2}).beside("moe")
        ['shared']
        """
        fed, out = self.inp(mlp), self.out(mlp)
        if fed is None or not isinstance(out, torch.Tensor):
            return []
        return [p for p, x in self.inputs.items() if p and "." not in p and p != mlp and self.close(x, fed)
                and isinstance(self.outputs.get(p), torch.Tensor) and self.outputs[p].shape == out.shape]


Found = Union[tuple, str]   # (attn_out path, mlp_out path[, {'norms' | 'scales': {component: ...}}]), or why not


@dataclass(frozen=True)
class Style:
    """A block style: how to find ``attn_out``/``mlp_out`` in a record, and what they mean.

    >>> from reftgraph.arch.styles import STYLES
    >>> STYLES[2].name, STYLES[2].has_mid, STYLES[2].attn_moves
    ('parallel', False, 'post')

    ``find(record, paths)`` returns ``(attn_out path, mlp_out path)`` or the reason the
    style does not hold; a third item adds ``{"norms": {component: norm path}}`` (the norm
    each addition passes through, Post-LN blocks) or ``{"scales": {component: attribute}}``
    (the block attribute each addition is scaled by), and ``{"beside": {"mlp_out": path}}`` a
    module whose output the block adds together with the MLP's (:meth:`Record.beside`).
    ``attn_moves`` is the stream that an edit of ``attn_out`` moves by exactly the edit:
    ``"mid"`` (what the MLP reads) or ``"post"`` (the block output).
    ``no_mid``: why ``resid_mid`` is refused in this style ('' where it is defined).
    """

    name: str
    doc: str
    has_mid: bool
    attn_moves: str
    find: Callable[[Record, object], Found]
    no_mid: str = ""
