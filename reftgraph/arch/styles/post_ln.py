"""Norms after the residual addition ("Post-LN": BERT, RoBERTa, BART, OpenAI GPT): the block
returns ``norm(stream + sublayer)``.

>>> STYLE.name, STYLE.has_mid
('post_ln', True)

``attn_out`` / ``mlp_out`` are what the sub-layers add *before* the norms (the output
projection's and down projection's outputs); ``resid_mid = norm_1(resid_pre + attn_out)`` is
the first norm's output, what the MLP reads, and ``resid_post = norm_2(resid_mid + mlp_out)``.
An edit of ``attn_out`` by d moves ``resid_mid`` to ``norm_1(resid_pre + attn_out + d)``:
through the norm, not by d, and the proofs check exactly that.
"""

from __future__ import annotations

from typing import Optional

from .base import Record, Style

__all__ = ["STYLE", "norm_reading"]


def norm_reading(rec: Record, value, out=None) -> Optional[str]:
    """The first recorded module (called once) whose input is ``value`` and whose output has its
    shape (and equals ``out`` when given): the norm applied after an addition; None when none.

    >>> import torch
    >>> x = torch.ones(1, 2)
    >>> rec = Record(x, x, inputs={"ln": x * 2, "fc": x}, outputs={"ln": x, "fc": x}, calls={"ln": 1, "fc": 1})
    >>> norm_reading(rec, x * 2), norm_reading(rec, x * 3)
    ('ln', None)
    """
    for path, fed in rec.inputs.items():
        got = rec.outputs.get(path)
        if (path and rec.calls.get(path) == 1 and got is not None and rec.close(fed, value)
                and got.shape == value.shape and (out is None or rec.close(got, out))):
            return path
    return None


def _find(rec: Record, paths):
    reads = rec.inp(paths.mlp_in)
    if reads is None:
        return "the block has no MLP input to check"
    for attn in dict.fromkeys(p for p in (paths.attn, paths.attn_proj) if p):
        a = rec.out(attn)
        if a is None or a.shape != rec.pre.shape:
            continue
        first = norm_reading(rec, rec.pre + a, rec.inp(paths.cross) if paths.cross else reads)
        if first is None:
            continue
        mid, extras = rec.out(first), {"norms": {"attn_out": first}}
        if paths.cross:    # an encoder-decoder's cross-attention, then its own norm
            found = _cross(rec, paths, mid, reads)
            if isinstance(found, str):
                return found
            (extras["cross"], extras["norms"]["cross_attn_out"]), mid = found, rec.out(found[1])
        for mlp in dict.fromkeys(p for p in (paths.mlp, paths.mlp_down) if p):
            m = rec.out(mlp)
            if m is None or m.numel() != mid.numel():
                continue
            second = norm_reading(rec, mid + m.reshape(mid.shape), rec.post)
            if second is not None:
                extras["norms"]["mlp_out"] = second
                return attn, mlp, extras
        return f"no norm turns resid_mid + the MLP output into resid_post (after {first!r})"
    return "no norm reads resid_pre + the attention output and feeds the MLP"


def _cross(rec: Record, paths, mid, reads):
    """``(the cross-attention's addition, the norm after it)``, else why none was found."""
    for cross in dict.fromkeys(p for p in (paths.cross, paths.cross_proj) if p):
        c = rec.out(cross)
        norm = None if c is None or c.shape != mid.shape else norm_reading(rec, mid + c, reads)
        if norm is not None:
            return cross, norm
    return "no norm reads resid_mid + the cross-attention output and feeds the MLP"


STYLE = Style("post_ln", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
