"""Parallel attention and MLP (GPT-J, GPT-NeoX parallel, Falcon, Phi-1/2, Cohere).

>>> STYLE.has_mid
False

Both read ``resid_pre`` and ``resid_post = resid_pre + attn_out + mlp_out``. There is no
stream between the two sub-layers, so ``resid_mid`` is refused on these blocks.
"""

from __future__ import annotations

from .base import Record, Style

__all__ = ["STYLE"]


def _find(rec: Record, paths):
    a, m = rec.out(paths.attn), rec.out(paths.mlp)
    if a is None or m is None:
        return "a parallel block needs both attention and an MLP"
    if a.shape[-1] != rec.pre.shape[-1] or m.shape[-1] != rec.pre.shape[-1]:
        return f"the attention or MLP module does not give the model width {rec.pre.shape[-1]}"
    if not rec.close(rec.pre + a + m, rec.post):
        return f"resid_pre + attn + mlp != resid_post ({rec.gap(rec.pre + a + m, rec.post)})"
    return paths.attn, paths.mlp


STYLE = Style("parallel", __doc__.split("\n\n")[0], has_mid=False, attn_moves="post", find=_find,
              no_mid="parallel block: attention and MLP both read resid_pre, so no stream lies between them "
                     "(use resid_pre or resid_post)")
