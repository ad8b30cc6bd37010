"""The figures reftgraph's plots return: matplotlib figures, shown once in a notebook.

>>> import matplotlib; matplotlib.use("Agg")
>>> fig, ax = new_figure(figsize=(3, 2))
>>> isinstance(fig, matplotlib.figure.Figure), fig.axes == [ax]
(True, True)

Every plot returns a :class:`Figure`. It is made through pyplot, so it shows as any
pyplot figure does: in Jupyter at the end of the cell (also after a trailing ``;``), in a
script on ``plt.show()``. In Jupyter it shows once: returned as a cell's value, IPython
draws it and takes it out of pyplot, whose inline backend would otherwise draw it again
when the cell ends. Save it with ``fig.savefig(path)``.

Plots that used to return their Axes (``heatmap``, ``draw_circuit``, ``plot_curve``,
``circuits.draw``) return a Figure that still answers the Axes' methods, with a
FutureWarning naming the way to write it now: ``fig.axes[0].set_title(...)``.
"""

from __future__ import annotations

import warnings

import matplotlib.figure
from matplotlib.axes import Axes

__all__ = ["new_figure"]   # and Figure, the class of what new_figure makes (matplotlib's own methods
                           # have no examples, so it stays out of the checked public names)


class Figure(matplotlib.figure.Figure):
    """A matplotlib Figure that IPython displays once (see the module docstring).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> fig, ax = new_figure(figsize=(3, 2), was_axes="heatmap")
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = fig.set_title("old style")
    >>> ax.get_title(), caught[0].category.__name__
    ('old style', 'FutureWarning')
    """

    def _ipython_display_(self) -> None:
        # IPython shows the figure here, both as a cell's value and when pyplot's inline
        # backend shows its open figures at the end of the cell: the first of the two
        # takes it out of pyplot, so the other finds nothing to show
        import base64

        import matplotlib.pyplot as plt
        from IPython.core.pylabtools import print_figure
        from IPython.display import display

        if self.canvas.manager is not None:
            plt.close(self)
        png = base64.b64encode(print_figure(self, "png", bbox_inches="tight")).decode("ascii")
        display({"image/png": png, "text/plain": repr(self)}, raw=True)

    def __getattr__(self, name: str):
        # called only when Figure has no ``name``: an Axes method of a plot that returned Axes
        axes, made_by = self.__dict__.get("_was_axes", (None, None))
        if axes is None or name.startswith("_") or not hasattr(Axes, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"{made_by} returns a matplotlib Figure now, not its Axes: write fig.axes[0].{name}",
                      FutureWarning, stacklevel=2)
        return getattr(axes, name)


def new_figure(ax=None, figsize=(6, 4), was_axes: str = None):
    """``(figure, axes)``: ``ax`` and its figure when given, else a new :class:`Figure`
    with one Axes. ``was_axes`` names a plot that used to return its Axes (see above).

    >>> import matplotlib; matplotlib.use("Agg")
    >>> fig, ax = new_figure()
    >>> new_figure(ax) == (fig, ax)
    True
    """
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, FigureClass=Figure)
    if was_axes:
        fig._was_axes = (ax, was_axes)
    return fig, ax
