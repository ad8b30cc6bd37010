"""The methods layer: what users do with graphs, each built on the engine and the training loop.

``reft`` (LoReFT graphs), ``das`` (distributed alignment search), ``memorisation``,
``patching`` (sweeps, path patching), ``subspace`` and ``causal`` (high-level models).

>>> from reftgraph.methods import patching
>>> sorted(patching.METRICS)
['kl', 'logit_diff', 'loss', 'prob']
"""

from . import causal, das, memorisation, patching, reft, subspace

__all__ = ["causal", "das", "memorisation", "patching", "reft", "subspace"]
