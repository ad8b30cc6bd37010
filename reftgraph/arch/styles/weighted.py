"""Weighted residual additions (Beam's depth-scaled sum, Ergo's residual gates, Dory's
interpolation, MiniMax's alpha/beta, Gemma 4's layer scalar): the block computes
``alpha * stream + beta * sublayer``, one weight per dimension.

>>> STYLE.name, STYLE.has_mid
('weighted', True)

``attn_out`` / ``mlp_out`` are what is *added*: ``beta * the sub-layer's output``, so an edit
of ``attn_out`` by d moves the weighted sum by exactly d. The stream the sub-layer is added
to (``alpha * stream``) may be the block's input or a norm of it (Dory, MiniMax), and the sum
may be read before more of the block runs (Gemma 4's per-layer input and scalar). No single
stream lies between the sub-layers, so ``resid_mid`` is refused. The weights come from the
block's own parameters in ways each architecture writes differently, so they are *measured*:
on the tiny instance a per-dimension least-squares fit over the tokens of one forward must be
exact (the proof of the form); on every real block, when a model is wrapped, ``beta`` is how
far the sum moves per unit added to the module, the same on every token
(:mod:`reftgraph.arch.proofs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Record, Style
from .post_norm import after

__all__ = ["STYLE", "Weighing", "weigh", "value"]


@dataclass(frozen=True)
class Weighing:
    """Where one weighted addition is read: ``(path, "input" | "output")`` of the stream it is
    added to, of the module whose output is added, and of the sum.

    >>> Weighing(("", "input"), ("attn", "output"), ("ln_2", "input")).added
    ('attn', 'output')
    """

    base: tuple
    added: tuple
    total: tuple
    others: tuple = ()    # what modules beside the sub-layer add to the same sum (Falcon-H1's Mamba mixer)


def value(rec: Record, where: tuple) -> Optional[torch.Tensor]:
    """The recorded tensor at ``(path, io)``.

    >>> import torch
    >>> value(Record(torch.zeros(1), torch.ones(1), outputs={"": torch.ones(1)}), ("", "output")).tolist()
    [1.0]
    """
    return (rec.inputs if where[1] == "input" else rec.outputs).get(where[0])


def weigh(base, added, total, tol: float = 1e-4, others=()) -> Optional[tuple]:
    """``(beta, error)``: per-dimension weights with ``total == alpha * base + beta * added (+ gamma
    * other ...)`` on every token (least squares) and the fit's largest relative error; None when
    it misses by more than ``tol``, the terms are not told apart, or a ``beta`` is zero.

    >>> import torch
    >>> s, a = torch.randn(5, 3), torch.randn(5, 3)
    >>> beta, error = weigh(s, a, 0.8 * s + torch.tensor([0.5, 2.0, 1.0]) * a)
    >>> [round(v, 4) for v in beta.tolist()], error < 1e-6
    ([0.5, 2.0, 1.0], True)
    """
    fit = _fit((base, added) + tuple(others), total)
    if fit is None or fit[1] > tol or bool((fit[0][:, 1].abs() <= 1e-6).any()):
        return None
    return fit[0][:, 1].float(), fit[1]


def _fit(terms: tuple, total) -> Optional[tuple]:
    """``(weights [width, terms], the largest error relative to the total)`` of the per-dimension
    least squares of ``total`` on ``terms``; None when the terms cannot be told apart."""
    if not isinstance(total, torch.Tensor) or any(not isinstance(t, torch.Tensor) or t.numel() != total.numel()
                                                  for t in terms):
        return None
    width = total.shape[-1]
    x = torch.stack([t.reshape(-1, width).double() for t in terms], -1).transpose(0, 1)   # [width, tokens, terms]
    y = total.reshape(-1, width).double().T.unsqueeze(-1)
    sv = torch.linalg.svdvals(x)
    if bool((sv[:, -1] <= 1e-9 * sv[:, 0].clamp_min(1e-30)).any()):
        return None       # the terms move together in some dimension: their weights are not told apart
    w = torch.linalg.lstsq(x, y).solution
    err = ((x @ w) - y).abs().max() / (1 + y.abs().max())
    return w.squeeze(-1), float(err)


def _fed_by(rec: Record, stream, skip=()) -> list:
    """Block children whose input is ``stream`` and whose output keeps its shape (its norms)."""
    return [p for p, fed in rec.inputs.items() if p and "." not in p and p not in skip and rec.close(fed, stream)
            and isinstance(rec.outputs.get(p), torch.Tensor) and rec.outputs[p].shape == stream.shape]


def _one(rec: Record, module: str, bases: list, totals: list, sides=()):
    """``(Weighing, beta)`` of the candidates that fit best (the sub-layer alone, or with one
    module beside it in ``sides``: a small addition beside it could pass for rounding), else None."""
    best = None
    for others in [()] + [((p, "output"),) for p in sides]:
        for added in dict.fromkeys((after(rec, module, None), module)):
            for base in bases:
                for total in totals:
                    terms = (value(rec, base), value(rec, (added, "output"))) + tuple(value(rec, o) for o in others)
                    if any(rec.close(t, value(rec, total)) for t in terms):
                        continue     # (a module's input that is one of the terms itself: no sum)
                    fit = weigh(*terms[:2], value(rec, total), others=terms[2:])
                    if fit is not None and (best is None or fit[1] < best[0]):
                        best = fit[1], Weighing(base, (added, "output"), total, others), fit[0]
    return None if best is None else best[1:]


def _find(rec: Record, paths):
    if not paths.attn or not paths.mlp:
        return "needs attention and an MLP"
    at = rec.mid_path(paths.mlp_in)
    mid = rec.inp(at)
    if mid is None:
        return "the MLP's input was not recorded"
    normed = _fed_by(rec, rec.pre)
    sides = [p for p in _fed_by(rec, rec.out(normed[0])) if p not in (paths.attn, paths.mlp)] if normed else []
    attn = _one(rec, paths.attn, [("", "input")] + [(p, "output") for p in normed], [(at, "input")], sides)
    if attn is None:
        return "the stream the MLP reads is not alpha * resid_pre (or a norm of it) + beta * the attention output"
    skip = (paths.mlp, at) if at != paths.mlp_in else (paths.mlp,)
    totals = [("", "output")] + [(p, "input") for p in rec.inputs if p and "." not in p and p not in skip
                                 and p not in (attn[0].added[0], paths.attn)]
    mlp = _one(rec, paths.mlp, [(at, "input")] + [(p, "output") for p in _fed_by(rec, mid, (paths.mlp,))], totals)
    if mlp is None:
        return "the block's output is not alpha * what the MLP reads (or a norm of it) + beta * the MLP output"
    return attn[0].added[0], mlp[0].added[0], {"weights": {"attn_out": attn, "mlp_out": mlp}}


STYLE = Style("weighted", __doc__.split("\n\n")[0], has_mid=True, attn_moves="mid", find=_find,
              no_mid="weighted block: the stream between the sub-layers is a weighted sum (alpha * stream + beta * "
                     "attention) the block computes in its own code, which no module returns whole (use resid_pre "
                     "or resid_post)")
