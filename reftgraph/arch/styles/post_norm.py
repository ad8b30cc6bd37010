"""Norms after the sub-layers (Gemma 2/3, OLMo2): the block adds ``norm(attn(...))``.

>>> STYLE.name, STYLE.attn_moves
('post_norm', 'mid')

``attn_out`` / ``mlp_out`` are the outputs of the norms applied to the attention and MLP
outputs, because that is what is added to the stream; the sequential identities then hold.
``head_out`` is still read before the norm (the output projection's input).
"""

from __future__ import annotations

from .base import Record, Style
from .sequential import check

__all__ = ["STYLE", "after"]


def after(rec: Record, path, paths) -> str:
    """The block's child module that reads ``path``'s output (its post-norm), else ``path``.

    >>> import torch
    >>> x = torch.ones(1)
    >>> after(Record(x, x, inputs={"norm": x * 2}, outputs={"attn": x * 2, "norm": x}), "attn", None)
    'norm'
    """
    out = rec.out(path)
    for child, value in rec.inputs.items():
        result = rec.outputs.get(child)
        if (child != path and "." not in child and child and rec.close(value, out)
                and result is not None and result.shape == value.shape):   # a norm keeps the shape
            return child
    return path


def _find(rec: Record, paths):
    attn = after(rec, paths.attn, paths) if paths.attn else None
    mlp = after(rec, paths.mlp, paths) if paths.mlp else None
    if (attn, mlp) == (paths.attn, paths.mlp):
        return "no norm reads the attention or MLP output"
    cross = after(rec, paths.cross, paths) if paths.cross else None   # (T5Gemma: a norm after the cross-attention)
    return check(rec, attn, mlp, paths.mlp_in, cross, paths.cross)


STYLE = Style("post_norm", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
