"""Sequential pre-norm blocks (Llama, Mistral, Qwen, GPT-2): attention, then the MLP.

>>> STYLE.name, STYLE.has_mid
('sequential', True)

``attn_out`` is the attention module's output and ``mlp_out`` the MLP's;
``resid_mid = resid_pre + attn_out`` is what the MLP's norm reads and
``resid_post = resid_mid + mlp_out``.
"""

from __future__ import annotations

from .base import Record, Style

__all__ = ["STYLE", "check"]


def check(rec: Record, attn, mlp, reads=None):
    """``(attn, mlp)`` when ``pre + attn == mid`` and ``mid + mlp == post``, else why not.

    >>> import torch
    >>> x = torch.ones(2)
    >>> rec = Record(x, x * 6, inputs={"m": x * 3}, outputs={"a": x * 2, "m": x * 3})   # 1 + 2 = 3; 3 + 3 = 6
    >>> check(rec, "a", "m")
    ('a', 'm')

    ``mid`` is what the MLP reads: the input of ``reads`` (default ``mlp``) or of its norm.
    """
    a, m, mid = rec.out(attn), rec.out(mlp), rec.mid(reads or mlp) if mlp else rec.post
    for name, value in ((attn, a), (mlp, m)):
        if value is not None and value.shape[-1] != rec.pre.shape[-1]:
            return f"{name} gives width {value.shape[-1]}, not the model width {rec.pre.shape[-1]}"
    pre_a = None if a is None else rec.pre + a
    mid_m = None if m is None or mid is None else mid + m
    if attn and not rec.close(pre_a, mid):
        return f"resid_pre + {attn} != what the MLP reads ({rec.gap(pre_a, mid)})"
    if mlp and not rec.close(mid_m, rec.post):
        return f"resid_mid + {mlp} != resid_post ({rec.gap(mid_m, rec.post)})"
    return attn, mlp


def _find(rec: Record, paths):
    if not paths.attn and not paths.mlp:
        return "the block has neither attention nor an MLP"
    return check(rec, paths.attn, paths.mlp, paths.mlp_in)


STYLE = Style("sequential", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
