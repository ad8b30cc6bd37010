"""Sequential pre-norm blocks (Llama, Mistral, Qwen, GPT-2): attention, then the MLP.

>>> STYLE.name, STYLE.has_mid
('sequential', True)

``attn_out`` is the attention module's output and ``mlp_out`` the MLP's;
``resid_mid = resid_pre + attn_out`` is what the MLP's norm reads and
``resid_post = resid_mid + mlp_out``. Where the block adds the MLP's output together with a
module beside it that reads the same input (GraniteMoeHybrid's shared MLP beside its
experts), ``mlp_out`` is their sum (read inside the block's forward:
:mod:`reftgraph.arch.components.outputs`).
"""

from __future__ import annotations

from .base import Record, Style

__all__ = ["STYLE", "check"]


def check(rec: Record, attn, mlp, reads=None, cross=None, cross_reads=None):
    """``(attn, mlp)`` when ``pre + attn == mid`` and ``mid + mlp == post``, else why not.

    >>> import torch
    >>> x = torch.ones(2)
    >>> rec = Record(x, x * 6, inputs={"m": x * 3}, outputs={"a": x * 2, "m": x * 3})   # 1 + 2 = 3; 3 + 3 = 6
    >>> check(rec, "a", "m")
    ('a', 'm')

    ``mid`` is what the MLP reads: the input of ``reads`` (default ``mlp``) or of its norm.
    With ``cross`` (an encoder-decoder's cross-attention, between attention and MLP),
    ``pre + attn`` is what the cross-attention (``cross_reads``, default ``cross``) reads, and
    that plus ``cross`` is ``mid``; the third item is then ``{"cross": cross}``.
    """
    a, m, mid = rec.out(attn), rec.out(mlp), rec.mid(reads or mlp) if mlp else rec.post
    c, between = (rec.out(cross), rec.mid(cross_reads or cross)) if cross else (None, mid)
    for name, value in ((attn, a), (mlp, m), (cross, c)):
        if value is not None and value.shape[-1] != rec.pre.shape[-1]:
            return f"{name} gives width {value.shape[-1]}, not the model width {rec.pre.shape[-1]}"
    pre_a = None if a is None else rec.pre + a
    mid_m = None if m is None or mid is None else mid + m
    if attn and not rec.close(pre_a, between):
        return f"resid_pre + {attn} != what the {'cross-attention' if cross else 'MLP'} reads ({rec.gap(pre_a, between)})"
    if cross:
        then = None if c is None or between is None else between + c
        if not rec.close(then, mid):
            return f"resid_mid + {cross} != what the MLP reads ({rec.gap(then, mid)})"
    extras = {"cross": cross} if cross else {}
    if mlp and not rec.close(mid_m, rec.post):
        sides = rec.beside(mlp) if mid_m is not None else []
        side = next((p for p in sides if rec.close(mid_m + rec.out(p), rec.post)), None)
        if side is None:
            return f"resid_mid + {mlp} != resid_post ({rec.gap(mid_m, rec.post)})"
        extras["beside"] = {"mlp_out": side}     # the block adds the MLP's output and this one's as one sum
    return (attn, mlp, extras) if extras else (attn, mlp)


def _find(rec: Record, paths):
    if not paths.attn and not paths.mlp:
        return "the block has neither attention nor an MLP"
    return check(rec, paths.attn, paths.mlp, paths.mlp_in, paths.cross)


STYLE = Style("sequential", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
