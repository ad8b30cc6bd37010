"""Experiments on the default model that combine the shipped data with the methods: the
demo's style experiment (:mod:`reftgraph.experiments.style`).

>>> from reftgraph.experiments import STYLES
>>> sorted(STYLES)
['caps', 'title']

This layer sits above :mod:`reftgraph.datasets` and :mod:`reftgraph.methods`; only the CLI
imports it.
"""

from .style import STYLES, style_experiment, style_pairs

__all__ = ["STYLES", "style_experiment", "style_pairs"]
