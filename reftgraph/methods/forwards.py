"""An executor's jobs with a progress bar: a step per forward here, all at once for a remote session.

>>> import reftgraph as rg
>>> from reftgraph.engine import Job, compile_graph, executor, tokenize
>>> lm = rg.models.tiny("llama")
>>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
>>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(batch), inputs, lambda logits, collected: logits.shape[0])
>>> run_jobs(executor(lm), [job, job], progress=False)
[2, 2]
"""

from __future__ import annotations

from typing import Sequence

from ..engine import Job, Local
from ..viz.progress import progress_bar

__all__ = ["run_jobs"]


def run_jobs(ex: Local, jobs: Sequence[Job], progress: bool = True, desc: str = None, bar=None) -> list:
    """``ex.map(jobs)`` (an executor: :func:`reftgraph.engine.executors.executor`) with a progress bar.

    >>> import reftgraph as rg
    >>> from reftgraph.engine import Job, compile_graph, executor, tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, batch = tokenize(lm, {"base": ["ab"]})
    >>> job = Job(compile_graph(rg.Graph(), lm.arch).bind(batch), inputs, lambda logits, collected: 1)
    >>> run_jobs(executor(lm, remote="local"), [job] * 3, progress=False)
    [1, 1, 1]

    With a remote executor all jobs go in one nnsight session (one request) and the bar
    advances when its results are back. ``bar``: an open bar to advance instead of a new
    one (``progress`` and ``desc`` are then unused).
    """
    if bar is not None:
        return ex.map(jobs, done=bar.update)
    with progress_bar(total=len(jobs), desc=desc, progress=progress) as own:
        return ex.map(jobs, done=own.update)
