"""Steering vectors from contrastive pairs: DiffMean (the strongest simple baseline in
AxBench) and the first principal direction of the pairs' differences (as repeng does).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> site = rg.Site("resid_post", layer=1, positions="last")
>>> g = diffmean(lm, ["I love it", "so good"], ["I hate it", "so bad"], site)
>>> g["steer"].site, g["steer"].op.vector.shape
(Site(component='resid_post', layer=1, positions='all', head=None, subspace=None), torch.Size([32]))

The vector is read at ``site`` (each prompt's mean over the site's positions, then the
positive mean minus the negative mean) and returned as a one-node graph that adds it at the
same component and layer on ``apply_positions`` (default ``"all"``: the prompt and every
generated token). :func:`scale_sweep` generates at several scales and reports how often a
behaviour appears, what it costs in fluency, and the texts themselves.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.graph import Graph
from ..core.masks import masked_mean
from ..core.ops import Add, Collect
from ..core.sites import Site
from ..engine import Template, as_model, format_prompt, run
from ..errors import DataError
from ..training.losses import lm_loss
from ..viz.progress import progress_bar

__all__ = ["contrast", "diffmean", "scale_sweep"]

METHODS = ("mean", "pca")


def _prompts(name: str, prompts) -> list:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DataError(f"{name} must be a non-empty list of non-empty strings, got {prompts!r:.80}")
    return list(prompts)


def contrast(model, positive: Sequence[str], negative: Sequence[str], site: Site,
             batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)``: each prompt's activation at ``site``, averaged over its positions.

    >>> import reftgraph as rg
    >>> pos, neg = contrast(rg.models.tiny("llama"), ["a", "b", "c"], ["d"], rg.Site("mlp_out", layer=0))
    >>> pos.shape, neg.shape
    (torch.Size([3, 32]), torch.Size([1, 32]))

    Head components give ``[n, heads, head_dim]``. A progress bar counts the prompts
    (``progress=False`` hides it).
    """
    positive, negative = _prompts("positive", positive), _prompts("negative", negative)
    g = Graph()
    g.add(site, Collect(), name="read")
    means = []
    with progress_bar(total=len(positive) + len(negative), desc="contrast", progress=progress, unit="prompt") as bar:
        for prompts in (positive, negative):
            rows = []
            for start in range(0, len(prompts), batch_size):
                out = run(g, model, prompts[start:start + batch_size])
                rows.append(masked_mean(out["read"], out.valid["read"], 1))
                bar.update(len(prompts[start:start + batch_size]))
            means.append(torch.cat(rows))
    return means[0], means[1]


def diffmean(model, positive: Sequence[str], negative: Sequence[str], site: Site, *, method: str = "mean",
             apply_positions="all", scale: float = 1.0, name: str = "steer", progress: bool = True) -> Graph:
    """A one-node graph adding ``mean(positive) - mean(negative)`` read at ``site``.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = diffmean(lm, ["yes", "sure"], ["no", "never"], rg.Site("resid_post", layer=0), method="pca")
    >>> out = g.generate(lm, ["Well,"], max_new_tokens=2)

    ``method="pca"`` takes the first singular direction of the paired differences
    ``positive[i] - negative[i]`` (equal counts; not centred, so a shared shift counts),
    signed to agree with the mean difference and scaled to its length. ``progress`` as in
    :func:`contrast`.
    """
    if method not in METHODS:
        raise DataError(f"method must be one of {METHODS}, got {method!r}")
    positive, negative = _prompts("positive", positive), _prompts("negative", negative)
    if method == "pca" and len(positive) != len(negative):
        raise DataError(f"method='pca' pairs prompts: {len(positive)} positive and {len(negative)} negative prompts")
    pos, neg = contrast(model, positive, negative, site, progress=progress)
    vector = pos.mean(0) - neg.mean(0)
    if method == "pca":
        diffs = (pos - neg).flatten(1)
        direction = torch.linalg.svd(diffs, full_matrices=False).Vh[0].view_as(vector)
        sign = 1.0 if float((direction * vector).sum()) >= 0 else -1.0
        vector = sign * direction * vector.norm()
    g = Graph()
    g.add(site.replace(positions=apply_positions), Add(vector.detach(), scale=scale), name=name)
    return g


def _continuation_loss(model, prompt: str, text: str) -> float:
    """Mean negative log-likelihood per token of ``text`` after ``prompt`` (as the model saw
    it, template applied) under the unedited model."""
    tok = model.tokenizer
    ids = tok(prompt + text, return_tensors="pt")["input_ids"].to(model.device)
    start = len(tok(prompt)["input_ids"])
    if ids.shape[1] <= start:
        return float("nan")
    labels = ids.clone()
    labels[:, :start] = -100   # score the continuation only
    with torch.no_grad():
        return float(lm_loss(model.hf(input_ids=ids).logits, labels))


def scale_sweep(model, graph: Graph, prompts: Sequence[str], scales: Sequence[float],
                behaviour: Callable[[str], bool], *, node: str = "steer", max_new_tokens: int = 20,
                template: Template = None, progress: bool = True, **generate_kwargs):
    """Generate at each scale: the behaviour's rate, the fluency cost and the texts, as a DataFrame.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = diffmean(lm, ["yes"], ["no"], rg.Site("resid_post", layer=0))
    >>> df = scale_sweep(lm, g, ["Hi"], [0, 4], lambda text: "y" in text, max_new_tokens=3)
    >>> list(df.columns), len(df), len(df["texts"][0])
    (['scale', 'rate', 'loss', 'n', 'texts'], 2, 1)

    ``rate`` is the fraction of generations for which ``behaviour(text)`` is true; ``loss``
    is the unedited model's mean loss per token on the steered answers (fluency: the base
    model's surprise at them); ``texts`` holds the generated texts, one per prompt, so the
    rates can be read against what the model said. ``template`` and other keyword
    arguments as in :func:`reftgraph.generate` (``template="chat"`` for instruct models:
    the prompts as user turns of the chat template, as they were trained). A progress bar
    counts the scales (``progress=False`` hides it). The node's scale is restored afterwards.
    """
    import pandas as pd

    prompts = _prompts("prompts", prompts)
    if not scales:
        raise DataError("scales must be a non-empty list of numbers")
    if node not in graph:
        raise DataError(f"no node {node!r} in the graph; nodes: {sorted(n.name for n in graph)}")
    shown = [format_prompt(as_model(model).tokenizer, p, template) for p in prompts]   # checked before any forward
    op = graph[node].op
    old, rows = op.scale, []
    try:
        for s in progress_bar(scales, desc="scale sweep", progress=progress, unit="scale"):
            op.scale = float(s)
            texts = graph.generate(model, shown, max_new_tokens=max_new_tokens, **generate_kwargs).texts
            losses = [_continuation_loss(model, p, t) for p, t in zip(shown, texts)]
            finite = [x for x in losses if x == x]
            rows.append({"scale": float(s), "rate": sum(map(bool, map(behaviour, texts))) / len(texts),
                         "loss": sum(finite) / len(finite) if finite else float("nan"), "n": len(texts),
                         "texts": list(texts)})
    finally:
        op.scale = old
    return pd.DataFrame(rows)
