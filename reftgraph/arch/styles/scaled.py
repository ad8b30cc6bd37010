"""Scaled residual additions (Granite's ``residual_multiplier``, MiniCPM3's
``scale_depth / sqrt(layers)``): the block adds ``c * attn`` and ``c * mlp``.

>>> STYLE.name, STYLE.has_mid
('scaled', True)

``attn_out`` / ``mlp_out`` are what is *added*: the sub-layer's output times the block's
scale, so ``resid_pre + attn_out == resid_mid`` and ``resid_mid + mlp_out == resid_post``
hold as in sequential blocks (a block without attention adds its MLP alone this way). Where
the block adds the MLP's output together with a module beside it that reads the same input
(GraniteMoeHybrid's shared MLP beside its experts), ``mlp_out`` is the scale times their sum,
read from the operation inside the block's forward that adds them. The scale is the number
the block itself holds (an attribute set from the config when the block was built), read
from each real block when a model is wrapped: a scale that depends on the depth is the real
model's, not the tiny instance's.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Record, Style

__all__ = ["STYLE", "attribute", "block_scales", "fit"]


def fit(added, out) -> Optional[float]:
    """The scalar c with ``added == c * out`` (least squares), None when there is none.

    >>> import torch
    >>> fit(torch.ones(3) * 0.5, torch.ones(3)), fit(torch.tensor([1., 2.]), torch.tensor([1., 1.]))
    (0.5, None)
    """
    if added is None or out is None or added.numel() != out.numel():
        return None
    a, o = added.reshape(-1).double(), out.reshape(-1).double()
    c = float((a @ o) / (o @ o).clamp_min(1e-30))
    return c if Record.close((c * o).float(), a.float()) and abs(c - 1) > 1e-6 else None


def block_scales(block) -> dict:
    """``{attribute: value}``: the floats a block module holds (its own attributes; a count is no scale).

    >>> import torch
    >>> m = torch.nn.Linear(2, 2); m.residual_multiplier = 0.25
    >>> block_scales(m)
    {'residual_multiplier': 0.25}
    """
    out = {}
    for name, value in vars(block).items():
        if isinstance(value, bool) or name.startswith("_"):
            continue
        if isinstance(value, float):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            out[name] = float(value)
    return out


def attribute(scales: dict, c: float) -> Optional[str]:
    """The name of the block attribute in ``scales`` that holds ``c`` (None when none does).

    >>> attribute({'residual_multiplier': 0.25}, 0.25)
    'residual_multiplier'
    """
    return next((name for name, v in scales.items() if abs(v - c) <= 1e-5 * max(1.0, abs(c))), None)


def _find(rec: Record, paths):
    if not paths.mlp:
        return "needs an MLP"
    mid = rec.mid(paths.mlp_in)
    m = rec.out(paths.mlp)
    adds = {"attn_out": fit(None if mid is None else mid - rec.pre, rec.out(paths.attn))} if paths.attn else {}
    after = None if mid is None or m is None else rec.post - mid
    adds["mlp_out"], beside = fit(after, m), {}
    if adds["mlp_out"] is None and after is not None:     # the MLP's output and one beside it, added as one sum
        for side in rec.beside(paths.mlp):
            adds["mlp_out"] = fit(after, m + rec.out(side))
            if adds["mlp_out"] is not None:
                beside["mlp_out"] = side
                break
    if None in adds.values():
        return f"the {' and '.join(c[:-4] for c in adds)} outputs are not added with one scale each"
    found = {}
    for component, c in adds.items():
        name = attribute(rec.scales, c)
        if name is None:
            return f"{component} is added times {c:.4g}, which no attribute of the block holds"
        found[component] = name
    return paths.attn, paths.mlp, {"scales": found, "beside": beside}


STYLE = Style("scaled", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find)
