"""Sub-layers that add the residual themselves (Bloom; MPT's MLP): ``mlp(x, residual)`` returns the stream.

>>> STYLE.name, STYLE.has_mid
('inner_residual', True)

The attention module may return ``resid_pre + dense(...)`` and the MLP ``resid_mid + down(...)``,
so ``attn_out`` / ``mlp_out`` are the outputs of the output and down projections (what is
added), ``resid_mid = resid_pre + attn_out``, and the sequential identities hold.
"""

from __future__ import annotations

from .base import Record, Style
from .sequential import check

__all__ = ["STYLE"]


def _find(rec: Record, paths):
    if not (paths.attn_proj and paths.mlp_down and paths.attn and paths.mlp):
        return "needs an output projection and a down projection"
    if paths.cross and not paths.cross_proj:
        return "needs the cross-attention's output projection"
    return check(rec, paths.attn_proj, paths.mlp_down, paths.mlp_in, paths.cross_proj, paths.cross)


STYLE = Style("inner_residual", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
