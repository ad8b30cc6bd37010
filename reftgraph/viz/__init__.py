"""The viz layer: matplotlib figures of graphs, training histories, patching results and
circuits (each a :class:`~reftgraph.viz.figure.Figure`, shown once in a notebook), and the
progress bars long calls show.

>>> import reftgraph as rg
>>> from reftgraph.viz import draw_graph
>>> draw_graph(rg.Graph()).axes[0].get_title()
'0 nodes, 0 trainable parameters'
"""

from ..core.graph import provide
from .circuits import draw_circuit, draw_edges, plot_curve, plot_mib
from .figure import Figure, new_figure
from .patching import heatmap
from .plot import draw_graph, plot_history
from .progress import progress_bar

provide("draw", draw_graph)

__all__ = ["draw_circuit", "draw_edges", "draw_graph", "heatmap", "new_figure", "plot_curve", "plot_history", "plot_mib",
           "progress_bar"]
