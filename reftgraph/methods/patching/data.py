"""Where :class:`~reftgraph.training.counterfactual.Counterfactual` was defined; it lives in
the training layer now, beside the other data types, and this path still imports it.

>>> import reftgraph as rg
>>> from reftgraph.training.counterfactual import Counterfactual as moved
>>> Counterfactual is moved is rg.patching.Counterfactual
True
"""

from __future__ import annotations

from ...training.counterfactual import Counterfactual  # noqa: F401  (the old import path)
