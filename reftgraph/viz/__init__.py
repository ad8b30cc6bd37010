"""The viz layer: matplotlib figures of graphs, training histories, patching results and circuits.

>>> import reftgraph as rg
>>> from reftgraph.viz import draw_graph
>>> draw_graph(rg.Graph()).axes[0].get_title()
'0 nodes, 0 trainable parameters'
"""

from ..core.graph import provide
from .circuits import draw_circuit, plot_curve
from .patching import heatmap
from .plot import draw_graph, plot_history

provide("draw", draw_graph)

__all__ = ["draw_circuit", "draw_graph", "heatmap", "plot_curve", "plot_history"]
