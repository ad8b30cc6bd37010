"""Progress bars: a widget in Jupyter when ipywidgets is installed, else a text bar on stderr.

>>> import io
>>> out = io.StringIO()
>>> for _ in progress_bar(range(3), desc="demo", file=out, delay=0):
...     pass
>>> "demo: 100%|" in out.getvalue()
True

``tqdm.auto`` alone would print ``TqdmWarning: IProgress not found`` in a notebook without
ipywidgets before falling back to the text bar; :func:`bar_class` picks the text bar itself.
A bar appears only once its task has taken ``DELAY`` seconds, so quick calls stay quiet.
"""

from __future__ import annotations

import importlib.util

__all__ = ["DELAY", "bar_class", "progress_bar"]

DELAY = 0.5   # seconds before a bar first shows


def bar_class():
    """``tqdm.auto.tqdm`` when ipywidgets can be imported, else ``tqdm.tqdm`` (the text bar).

    >>> bar_class().__name__ in ("tqdm", "tqdm_notebook")
    True
    """
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def progress_bar(iterable=None, *, total=None, desc: str = None, progress: bool = True, **kwargs):
    """A tqdm bar over ``iterable`` (or ``total`` steps, advanced with ``update``), silent
    when ``progress`` is false.

    >>> [x for x in progress_bar(range(3), desc="demo", progress=False)]
    [0, 1, 2]
    """
    options = dict(total=total, desc=desc, disable=not progress, dynamic_ncols=True, delay=DELAY)
    options.update(kwargs)
    return bar_class()(iterable, **options)
