"""Activation patching: counterfactual data, metrics, batched sweeps and path patching.

>>> import reftgraph as rg
>>> sorted(rg.patching.METRICS)
['kl', 'logit_diff', 'loss', 'prob']
"""

from .attribution import attribute
from ...training.counterfactual import Counterfactual
from .metrics import METRICS, Reference, kl, logit_diff, loss, prob, restoration
from .paths import path_graph, path_patch, path_sweep
from ...viz.patching import heatmap
from .sweeps import SweepConfig, sweep

__all__ = ["attribute", "Counterfactual", "METRICS", "Reference", "kl", "logit_diff", "loss", "prob", "restoration", "SweepConfig", "sweep", "heatmap", "path_graph", "path_patch", "path_sweep"]
