"""Activation patching: counterfactual data, metrics, batched sweeps and path patching.

>>> import reftgraph as rg
>>> sorted(rg.patching.METRICS)
['kl', 'logit_diff', 'loss', 'prob']
"""

from .data import Counterfactual
from .metrics import METRICS, Reference, kl, logit_diff, loss, prob, restoration
from .sweeps import sweep

__all__ = ["Counterfactual", "METRICS", "Reference", "kl", "logit_diff", "loss", "prob", "restoration", "sweep"]
