"""The methods layer: what users do with graphs, each built on the engine and the training loop.

``reft`` (LoReFT graphs), ``das`` (distributed alignment search), ``memorisation``,
``patching`` (sweeps, attribution, path patching), ``circuits`` (circuits found by
attribution, as graphs), ``subspace``, ``causal`` (high-level models) and
``steering`` (DiffMean vectors from contrastive pairs) and ``features`` (sparse
autoencoders: feature activations, attribution, circuits, ReFT explained in features).

>>> from reftgraph.methods import patching
>>> sorted(patching.METRICS)
['kl', 'logit_diff', 'loss', 'prob']
"""

from . import causal, circuits, das, features, memorisation, patching, reft, steering, subspace

__all__ = ["causal", "circuits", "das", "features", "memorisation", "patching", "reft", "steering", "subspace"]
