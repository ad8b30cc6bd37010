"""Train a graph's parameters on prompt -> response (or classification) data, model frozen.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[1], positions="f1+l1", rank=2)
>>> data = rg.data.PromptResponse([("ab", "cd"), ("abc", "d")])
>>> history = rg.train(g, lm, data, epochs=2, batch_size=2, progress=False)
>>> list(history.columns[:4])
['epoch', 'step', 'loss', 'lr']

AdamW with a linear schedule (warm-up, then decay to zero), gradient accumulation,
a seeded data order, an evaluation callback, a checkpoint per epoch, an exact resume from
any of them, a stop on a non-finite loss and an optional frozen-prefix cache: the loop
is :func:`reftgraph.training.loop.fit`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch

from ..core.graph import Graph
from ..core.ops import Classify
from ..engine import Outputs, PrefixCache, as_model, compile_graph, executor, inference_mode
from .checkpoints import latest_checkpoint
from .data import Classification, PromptResponse, collate_lm
from .distributed import all_sum, share
from .loop import Callback, NonFiniteLoss, fit, positive_ints
from .losses import case_groups, kl_to_base, lm_loss

__all__ = ["NonFiniteLoss", "evaluate", "latest_checkpoint", "lm_loss", "train"]


def final_hidden(plan, model, inputs: dict, batch, cache: Optional[PrefixCache] = None, subspaces=None) -> Outputs:
    """The final hidden state ``[N, S, d]`` of a forward with ``plan``'s edits, and what it
    collects: what a training loss needs (the language-model head runs on the last position only).

    >>> import reftgraph as rg
    >>> from reftgraph.engine import compile_graph, tokenize
    >>> lm = rg.models.tiny("llama")
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> final_hidden(compile_graph(rg.Graph(), lm.arch), lm, inputs, batch).value.shape
    torch.Size([2, 3, 32])

    ``cache``: a :class:`~reftgraph.engine.PrefixCache` serving the blocks below the plan's
    lowest edit; ``subspaces``: per-row subspaces, as in :func:`reftgraph.run`.
    """
    skip = cache.skip(plan, inputs) if cache is not None else None
    return executor(model).forward(plan.bind(batch, subspaces), inputs, output="hidden", skip=skip)


def _batch_loss(plan, model, data, prompts, rows, classify, padding_side, max_length, cache=None, part=False,
                kl=None):
    """The mean loss of data rows ``rows`` (response tokens, or the Classify node's labels).

    With ``part``, this process's part of it under torch.distributed (its rows, weighted by
    its share of the batch's response tokens or rows; a zero without rows). With ``kl`` (a
    :class:`_KL`) its term is added; ``rows`` is then ``(rows, kl_rows)``."""
    rows, kl_rows = rows if isinstance(rows, tuple) else (rows, None)
    mine = share(rows) if part else rows
    if mine:
        responses = None if classify else [data.responses[i] for i in mine]
        inputs, batch, labels = collate_lm(model, [prompts[i] for i in mine], responses,
                                           padding_side=padding_side, max_length=max_length)
    if classify:
        weight = len(mine) / len(rows)
    else:   # this process's response tokens over the whole batch's
        tokens = int((labels[:, 1:] != -100).sum()) if mine else 0
        weight = tokens / max(1.0, all_sum(tokens)) if part else 1.0
    extra = kl.rows_loss(model, kl_rows, padding_side, max_length, part) if kl is not None and kl.data else 0.0
    if not mine:
        if kl is not None and not kl.data and part:
            all_sum(0)   # the other processes count their KL tokens
        return torch.zeros(()) + extra
    subspaces = None if data.subspaces is None else [data.subspaces[i] for i in mine]
    value, collected = final_hidden(plan, model, inputs, batch, cache, subspaces)
    if classify:
        target = torch.tensor([data.labels[i] for i in mine], device=value.device)
        return weight * torch.nn.functional.cross_entropy(collected[classify][0].float(), target) + extra
    loss = weight * lm_loss(value, labels, head=model.hf.get_output_embeddings())
    if kl is not None and not kl.data:
        loss = loss + kl.term(model, value, inputs, batch, labels, part)
    return loss + extra


def kl_batches(n: int, n_batches: int, seed: int, epoch: int) -> list:
    """Which of ``n`` KL rows go with each of an epoch's ``n_batches`` training batches: a
    seeded order per epoch cut into equal parts (the last wraps around), so every row is
    used once an epoch or more.

    >>> kl_batches(5, 2, seed=0, epoch=0)
    [[0, 2, 4], [0, 1, 3]]
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch + 1)).tolist()
    size = -(-n // n_batches)
    order = order + order[:size]
    return [sorted(order[(b * size) % n:(b * size) % n + size]) for b in range(n_batches)]


class _KL(Callback):
    """``weight`` x KL(unedited || edited) of the next-token distributions at response tokens,
    of the training rows themselves (``data`` None) or of KL rows of their own (``data``).
    As a callback it adds ``ce`` and ``kl`` (the weighted term) to each history row."""

    def __init__(self, plan, model, weight: float, data, groups, template, seed: int):
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                and weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {weight!r}")
        self.plan, self.weight, self.seed = plan, float(weight), seed
        if data is not None and not isinstance(data, PromptResponse):
            data = PromptResponse(list(data), template=template)
        self.data = data
        self.prompts = data.prompts(model) if data is not None else None
        vocab = model.hf.get_output_embeddings().weight.shape[0]
        self.groups_name = None if groups is None else groups if isinstance(groups, str) else "given"
        if isinstance(groups, str):
            if groups != "case":
                raise ValueError(f"kl_groups must be None, 'case' or a tensor of group ids, got {groups!r}")
            groups = case_groups(model.tokenizer, vocab)
        elif groups is not None:
            groups = torch.as_tensor(groups)
            if groups.shape != (vocab,) or groups.dtype != torch.long or bool((groups < 0).any()):
                raise ValueError(f"kl_groups must give one group id (an int >= 0) per token of the model's "
                                 f"{vocab:,d}, got a tensor of shape {tuple(groups.shape)} and dtype {groups.dtype}")
        self.groups = groups
        self.empty = compile_graph(Graph(), model.arch)
        self.parts: list = []   # this step's terms, one per batch (this process's part)

    def on_step(self, state, row: dict) -> None:
        value = all_sum(sum(self.parts)) / max(1, len(self.parts))
        self.parts = []
        row["ce"], row["kl"] = row["loss"] - value, value

    def settings(self) -> dict:
        """What a resume must match."""
        return {"kl_weight": self.weight, "kl_rows": len(self.data) if self.data is not None else 0,
                "kl_groups": self.groups_name}

    def rows(self, epoch: int, n_batches: int) -> list:
        """The KL rows of each of an epoch's ``n_batches`` batches: :func:`kl_batches`."""
        return kl_batches(len(self.data), n_batches, self.seed, epoch)

    def term(self, model, hidden, inputs, batch, labels, part) -> torch.Tensor:
        """The term on the response tokens of a batch whose edited final hidden states are ``hidden``."""
        keep = labels[:, 1:].to(hidden.device) != -100
        count = int(keep.sum())
        head = model.hf.get_output_embeddings()
        with torch.no_grad():
            base, _ = final_hidden(self.empty, model, inputs, batch)
            base = head(base[:, :-1][keep])
        total = kl_to_base(head(hidden[:, :-1][keep]), base, self.groups, reduction="sum")
        value = self.weight * total / max(1.0, all_sum(count) if part else count)
        self.parts.append(float(value.detach()))
        return value

    def rows_loss(self, model, rows, padding_side, max_length, part) -> torch.Tensor:
        """The term on KL rows ``rows`` (this process's share of them)."""
        mine = share(rows) if part else rows
        if not mine:
            if part:
                all_sum(0)   # the other processes count their KL tokens
            return torch.zeros(())
        inputs, batch, labels = collate_lm(model, [self.prompts[i] for i in mine],
                                           [self.data.responses[i] for i in mine],
                                           padding_side=padding_side, max_length=max_length)
        hidden, _ = final_hidden(self.plan, model, inputs, batch)
        return self.term(model, hidden, inputs, batch, labels, part)


def evaluate(graph: Graph, model, data, *, batch_size: int = 8, padding_side: str = "right",
             max_length: Optional[int] = None) -> float:
    """The training loss of ``graph`` on ``data``, without training (the mean over rows).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
    >>> data = rg.data.PromptResponse([("ab", "cd"), ("abc", "d")])
    >>> round(evaluate(g, lm, data), 4) == round(float(rg.train(g, lm, data, epochs=1, lr=1e-9, progress=False,
    ...     batch_size=2)["loss"].iloc[0]), 4)
    True

    ``reftgraph train`` scores a spec's ``data.eval_path`` this way after every epoch."""
    model = as_model(model, one_stack="rg.evaluate")
    positive_ints(batch_size=batch_size)
    plan = compile_graph(graph, model.arch)
    classify = _classify_node(graph) if isinstance(data, Classification) else None
    prompts = data.prompts(model)
    total = 0.0
    with torch.no_grad(), inference_mode(graph):
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompts))))
            total += float(_batch_loss(plan, model, data, prompts, rows, classify, padding_side, max_length)) * len(rows)
    return total / len(prompts)


def _classify_node(graph: Graph) -> str:
    names = [n.name for n in graph.nodes if isinstance(n.op, Classify)]
    if len(names) != 1:
        raise ValueError(f"classification needs exactly one Classify node in the graph, found {names}")
    return names[0]


def train(graph: Graph, model, data, *, epochs: int = 3, batch_size: int = 8, lr: float = 4e-3,
          weight_decay: float = 0.0, warmup: float = 0.1, grad_accum: int = 1, seed: int = 0,
          max_grad_norm: Optional[float] = 1.0, eval_fn: Optional[Callable] = None,
          checkpoint_dir=None, resume: Union[bool, str, Path] = False, progress: bool = True,
          padding_side: str = "right", max_length: Optional[int] = None, shuffle: bool = True,
          cache_prefix: bool = False, kl_weight: float = 0.0, kl_data=None,
          kl_groups: Union[None, str, torch.Tensor] = None) -> pd.DataFrame:
    """Train ``graph`` on ``data`` (:class:`PromptResponse` or :class:`Classification`).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
    >>> history = train(g, lm, rg.data.PromptResponse([("ab", "cd")]), epochs=4, lr=1e-2, progress=False)
    >>> len(history), bool(history["loss"].iloc[-1] < history["loss"].iloc[0])
    (4, True)

    Returns the history: one row per optimizer step (``epoch, step, loss, lr``) plus the
    metrics ``eval_fn(graph, model, epoch) -> dict`` returns after each epoch. With
    ``checkpoint_dir`` a checkpoint ``epoch-N`` is written after every epoch; ``resume=True``
    continues from the newest one, ``resume="ckpt/epoch-N"`` from that one, exactly (same
    data order, optimizer, schedule and random state; the other settings must match).

    ``shuffle=False`` keeps the data order fixed. ``cache_prefix=True`` computes the blocks
    below the graph's lowest edited layer once per batch (:mod:`reftgraph.prefix`); it needs
    batches that repeat every epoch: ``shuffle=False`` or one batch per epoch.

    ``kl_weight > 0`` adds ``kl_weight`` x KL(unedited || edited), the mean over response
    tokens of the divergence of the edited model's next-token distribution from the frozen
    model's (run without edits, without gradients, on the same tokens): it keeps what the
    graph should not change. The tokens are those of ``kl_data`` when given (neutral prompt ->
    response rows, e.g. questions with the model's own answers: a
    :class:`~reftgraph.training.data.PromptResponse` or pairs, templated like ``data``; each
    step takes its share, every row once an epoch), else the training rows' own responses.
    ``kl_groups="case"`` sums the probabilities of tokens that differ only in case before
    the KL (:func:`~reftgraph.training.losses.case_groups`; or pass one group id per token),
    so a change of case is free and a change of content is not:

    >>> facts = [("Sky colour?", "Blue."), ("Grass colour?", "Green.")]
    >>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
    >>> h = train(g, lm, rg.data.PromptResponse([("ab", "CD")]), epochs=2, progress=False,
    ...           kl_weight=1.0, kl_data=facts, kl_groups="case")
    >>> list(h.columns)
    ['epoch', 'step', 'loss', 'lr', 'ce', 'kl']

    The history then splits the loss into ``ce`` and ``kl`` (its weighted term). The
    recipe measured on SmolLM2: :mod:`reftgraph.experiments.style`.

    A NaN or infinite loss (or gradient) stops training before the optimizer step with
    :class:`NonFiniteLoss`; so does a step that makes a weight NaN or infinite (a huge
    ``lr``), after putting back the weights from before it. Either way the graph keeps its
    last finite weights and checkpoints stay as they were (none is written non-finite).

    Resuming refuses, with :class:`~reftgraph.errors.GraphFileError` listing the
    differences, a checkpoint of another graph (node names and order, sites, streams, op
    types and configs, shared ops, trainable nodes) or of other settings.
    """
    model = as_model(model, one_stack="rg.train")
    plan = compile_graph(graph, model.arch)
    positive_ints(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum)
    if not isinstance(data, (PromptResponse, Classification)):
        raise TypeError("data must be reftgraph.data.PromptResponse or Classification")
    classify = _classify_node(graph) if isinstance(data, Classification) else None
    prompts = data.prompts(model)
    n = len(prompts)
    batches_per_epoch = (n + batch_size - 1) // batch_size
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)  # a partial group at the end steps too
    if cache_prefix and shuffle and batch_size < n:
        raise ValueError(f"cache_prefix=True needs batches that repeat every epoch; with shuffle=True and "
                         f"batch_size {batch_size} < {n} rows they change: pass shuffle=False or "
                         f"batch_size >= {n}")
    cache = PrefixCache(model, max_entries=batches_per_epoch) if cache_prefix else None
    settings = {"rows": n, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "warmup": warmup, "grad_accum": grad_accum, "seed": seed, "max_grad_norm": max_grad_norm,
                "shuffle": shuffle, "padding_side": padding_side, "max_length": max_length}
    kl = None
    if kl_weight != 0 or kl_data is not None or kl_groups is not None:
        kl = _KL(plan, model, kl_weight, kl_data, kl_groups, data.template, seed)
        if classify and kl.data is None:
            raise ValueError("kl_weight on Classification data needs kl_data (prompt -> response rows): "
                             "the training rows have no response tokens")
        settings.update(kl.settings())
        if kl.weight == 0:
            kl = None

    def batches(epoch: int) -> list:
        order = list(range(n)) if not shuffle else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        rows = [sorted(order[b * batch_size:(b + 1) * batch_size]) for b in range(batches_per_epoch)]
        if kl is not None and kl.data is not None:
            return list(zip(rows, kl.rows(epoch, batches_per_epoch)))
        return rows

    def loss(rows) -> torch.Tensor:
        return _batch_loss(plan, model, data, prompts, rows, classify, padding_side, max_length, cache, part=True,
                           kl=kl)

    torch.manual_seed(seed)
    return fit(graph, model, batches, loss, epochs=epochs, lr=lr, weight_decay=weight_decay, schedule="linear",
               warmup=warmup, total_steps=steps_per_epoch * epochs,
               grad_accum=grad_accum, max_grad_norm=max_grad_norm, eval_fn=eval_fn, checkpoint_dir=checkpoint_dir,
               resume=resume, settings=settings, progress=progress, desc="train",
               callbacks=[kl] if kl is not None else ())
