"""Several traced forwards with a progress bar: locally one at a time, remotely in one session.

>>> import reftgraph as rg
>>> from reftgraph.engine.plan import compile_graph
>>> from reftgraph.engine.run import tokenize
>>> lm = rg.models.tiny("llama")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> job = (compile_graph(rg.Graph(), lm.arch), inputs, batch, lambda logits, collected: logits.shape[0])
>>> run_forwards(lm, [job, job], progress=False)
[2, 2]
"""

from __future__ import annotations

from typing import Sequence

from ..engine.remote import is_remote
from ..engine.run import forwards
from ..viz.progress import progress_bar

__all__ = ["run_forwards"]


def run_forwards(model, jobs: Sequence[tuple], remote=None, progress: bool = True, desc: str = None,
                 bar=None) -> list:
    """:func:`reftgraph.engine.run.forwards` of ``jobs`` (``(plan, inputs, batch, reduce)``)
    with a progress bar: a step per job locally, all steps at once for a remote session.

    >>> import reftgraph as rg
    >>> from reftgraph.engine.plan import compile_graph
    >>> from reftgraph.engine.run import tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, batch = tokenize(lm, {"base": ["ab"]})
    >>> job = (compile_graph(rg.Graph(), lm.arch), inputs, batch, lambda logits, collected: 1)
    >>> run_forwards(lm, [job] * 3, remote="local", progress=False)
    [1, 1, 1]

    With ``remote`` all jobs go in one nnsight session (one request) and the bar advances
    when its results are back. ``bar``: an open bar to advance instead of a new one
    (``progress`` and ``desc`` are then unused).
    """
    own = bar is None
    if own:
        bar = progress_bar(total=len(jobs), desc=desc, progress=progress)
    try:
        if is_remote(remote):
            results = forwards(model, jobs, remote)
            bar.update(len(jobs))
            return results
        results = []
        for job in jobs:
            results += forwards(model, [job])
            bar.update(1)
        return results
    finally:
        if own:
            bar.close()
