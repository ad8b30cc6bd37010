"""The one training loop: :func:`fit` trains a graph's parameters with the model frozen.

>>> import torch, reftgraph as rg
>>> from reftgraph.engine import compile_graph, executor, tokenize
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Add(torch.zeros(32), trainable=True), name="v")
>>> plan = compile_graph(g, lm.arch)
>>> inputs, batch = tokenize(lm, {"base": ["ab"]})
>>> def loss(_):
...     logits, _ = executor(lm).forward(plan.bind(batch), inputs)
...     return -logits[0, -1, 5]                  # push token 5 up
>>> history = fit(g, lm, lambda epoch: [None] * 3, loss, epochs=2, lr=0.1, progress=False)
>>> len(history), bool(history["loss"].iloc[-1] < history["loss"].iloc[0])
(6, True)

ReFT training (:func:`reftgraph.train`), DAS (:func:`reftgraph.das.train_das`, its
temperature annealing a callback) and the memorisation test
(:func:`reftgraph.memorisation.memorise`, its stop rule a callback) all run here, so the
guards live in one place: a frozen language model, trainable graph parameters, a finite
loss and gradient norm before every optimizer step, the ops in training mode while
training and in eval mode for evaluation and afterwards, checkpoints per epoch with an
exact resume, a progress bar and the history (one row per optimizer step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import pandas as pd
import torch

from ..viz.progress import progress_bar
from .checkpoints import checkpoint_folder, load_checkpoint, save_checkpoint, trainable_nodes
from .distributed import all_sum, barrier, broadcast, broadcast_json, init, is_main, sum_gradients

__all__ = ["Callback", "NonFiniteLoss", "State", "fit", "linear_schedule", "positive_ints"]


class NonFiniteLoss(FloatingPointError):
    """Training met a NaN or infinite loss, gradient or weight and stopped.

    >>> import torch, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.full((32,), float("nan")), trainable=True))
    >>> try:
    ...     rg.train(g, rg.models.tiny("llama"), rg.data.PromptResponse([("ab", "cd")]), progress=False)
    ... except NonFiniteLoss as e:
    ...     print(len(e.history), e.checkpoint)
    0 None

    ``history`` holds the rows of the good steps; ``checkpoint`` the newest good checkpoint
    folder (None without one). The graph keeps the weights of the last good step: a step
    that makes a weight NaN or infinite (or overflows) is undone before this is raised."""

    def __init__(self, message: str, history: pd.DataFrame, checkpoint: Optional[Path]):
        super().__init__(message)
        self.history = history
        self.checkpoint = checkpoint


def _any_process(stop: bool) -> bool:
    """True on every process when a callback on any of them set ``stop`` (a callback may
    decide from what only its process sees, e.g. its clock), so all stop at the same step."""
    return all_sum(float(stop)) > 0


class State:
    """What callbacks see: the epoch, the optimizer steps taken, the history rows, ``stop``.

    >>> s = State(graph=None, model=None, optimizer=None)
    >>> s.epoch, s.step, s.history, s.stop
    (0, 0, [], False)

    A callback sets ``stop = True`` to end training (before the backward pass when set
    in :meth:`Callback.on_loss`); with several processes, all stop when any sets it."""

    def __init__(self, graph, model, optimizer):
        self.graph, self.model, self.optimizer = graph, model, optimizer
        self.epoch = 0
        self.step = 0
        self.history: list = []
        self.stop = False


class Callback:
    """Hooks into :func:`fit`; override the ones you need (each does nothing by default).

    >>> class Count(Callback):
    ...     def on_step(self, state, row):
    ...         row["twice"] = 2 * row["step"]
    >>> Count().on_batch(None, None) is None
    True
    """

    def on_batch(self, state: State, batch) -> None:
        """Before the forward pass of ``batch`` (e.g. set a temperature).

        >>> Callback().on_batch(None, [0, 1]) is None
        True
        """

    def on_loss(self, state: State, loss: torch.Tensor, batch) -> None:
        """After the loss of ``batch``, before its backward pass; may set ``state.stop``.

        >>> Callback().on_loss(None, None, None) is None
        True
        """

    def on_step(self, state: State, row: dict) -> None:
        """After an optimizer step; ``row`` (epoch, step, loss, lr) may be extended.

        >>> Callback().on_step(None, {}) is None
        True
        """


def positive_ints(**values) -> None:
    """A ValueError naming the first of ``values`` that is not an int >= 1.

    >>> positive_ints(epochs=2, batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive int, got 0
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def linear_schedule(total: int, warmup: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then linear decay to zero.

    >>> f = linear_schedule(10, warmup=0.2)
    >>> [round(f(s), 2) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.12]

    ``warmup`` below 1 is a share of ``total``, otherwise a number of steps."""
    n_warm = int(round(warmup * total)) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    return factor


def _constant(step: int) -> float:
    return 1.0


def _stopped(what: str, state: State, last_good, kept: str, rows: str = "") -> NonFiniteLoss:
    where = (f"the last good checkpoint is {last_good}" if last_good is not None
             else "no checkpoint was written (pass checkpoint_dir= to keep one per epoch)")
    return NonFiniteLoss(
        f"training stopped: {what} at epoch {state.epoch}, step {state.step}{rows}; {kept}; {where}. "
        "Lower lr, clip gradients (max_grad_norm) or check the graph's ops and the data.",
        pd.DataFrame(state.history), last_good)


def _check_finite(value: torch.Tensor, what: str, state: State, batch, last_good) -> None:
    if bool(torch.isfinite(value.detach()).all()):
        return
    rows = f" (data rows {batch})" if isinstance(batch, (list, tuple)) else ""
    raise _stopped(f"the {what} is {float(value.detach())}", state, last_good,
                   "the optimizer step was not taken, so the graph keeps its weights from the last good step", rows)


def _nonfinite_nodes(graph) -> list:
    return [n.name for n in graph.nodes if not all(bool(torch.isfinite(p).all()) for p in n.op.parameters())]


def _checked_step(optimizer, params: list, state: State, last_good) -> None:
    """One optimizer step that never leaves non-finite weights: when the step overflows or
    makes a weight NaN or infinite, the weights from before it (the last finite ones, as
    each step is checked) are put back and :class:`NonFiniteLoss` is raised."""
    before = [p.detach().clone() for p in params]   # the graph's weights are small
    lr = float(optimizer.param_groups[0]["lr"])
    try:
        optimizer.step()
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        problem = None if finite else (f"the weights of node(s) {', '.join(map(repr, _nonfinite_nodes(state.graph)))} "
                                       f"became NaN or infinite in the optimizer step (lr {lr:g})")
    except RuntimeError as e:   # AdamW refuses a step size that does not fit the weights' dtype
        if "overflow" not in str(e):
            raise
        problem = f"the optimizer step overflowed (lr {lr:g}: {str(e).splitlines()[0]})"
    if problem is None:
        return
    with torch.no_grad():
        for p, old in zip(params, before):
            p.copy_(old)
    raise _stopped(problem, state, last_good,
                   "the graph was rolled back to its weights before that step (the last finite ones)")


def _check_rates(lr, weight_decay) -> None:
    for name, value, low in (("lr", lr, "> 0"), ("weight_decay", weight_decay, ">= 0")):
        try:
            ok = math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be {low} and finite, got {value!r}")


def fit(graph, model, batches: Callable[[int], Iterable], loss: Callable[[object], torch.Tensor], *,
        epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.0,
        schedule: Union[str, Callable[[int], float]] = "constant", warmup: float = 0.0,
        total_steps: Optional[int] = None, grad_accum: int = 1, max_grad_norm: Optional[float] = None,
        callbacks: Sequence[Callback] = (), eval_fn: Optional[Callable] = None, checkpoint_dir=None,
        resume: Union[bool, str, Path] = False, settings: Optional[dict] = None, progress: bool = True,
        desc: str = "train") -> pd.DataFrame:
    """Train ``graph``'s parameters: ``loss(batch)`` for each batch of ``batches(epoch)``.

    >>> import torch, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.zeros(32), trainable=True), name="v")
    >>> fit(g, rg.models.tiny("llama"), lambda e: [1, 2], lambda b: g["v"].op.vector.sum() ** 2 + b,
    ...     epochs=2, progress=False)[["epoch", "step"]].values.tolist()
    [[0, 0], [0, 1], [1, 2], [1, 3]]

    AdamW (``lr``, ``weight_decay``) with ``schedule`` ``"constant"``, ``"linear"`` (warm-up
    ``warmup``, then decay to zero over ``total_steps``, by default every step of every
    epoch) or a function of the step. ``grad_accum`` batches make one optimizer step
    (a partial group at an epoch's end steps too); ``max_grad_norm`` clips. After each
    epoch ``eval_fn(graph, model, epoch) -> dict`` adds metrics to the last history row,
    and with ``checkpoint_dir`` a checkpoint ``epoch-N`` is written; ``resume=True`` (the
    newest) or a folder continues exactly, refusing (``GraphFileError``) a checkpoint of
    another graph or other ``settings`` than the saved ones. ``lr`` must be finite and > 0;
    after every optimizer step the weights are checked, and a step that makes one NaN or
    infinite is undone before :class:`NonFiniteLoss` is raised.

    Under ``torchrun`` / ``accelerate launch`` (see :mod:`reftgraph.training.distributed`)
    ``loss(batch)`` returns this process's part of the batch's loss (the parts add up to it;
    :func:`~reftgraph.training.distributed.share` picks a process's rows): the gradients are
    summed over processes before each step, the history holds the whole batch's loss on
    every process, ``eval_fn`` runs on process 0 and its metrics reach every process, and
    process 0 alone writes the checkpoints.
    """
    positive_ints(epochs=epochs, grad_accum=grad_accum)
    _check_rates(lr, weight_decay)
    params = [p for p in graph.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the graph has no trainable parameters")
    if any(p.requires_grad for p in model.hf.parameters()):
        raise ValueError("the language model has trainable parameters; freeze it (rg.wrap freezes by default)")
    init()
    broadcast(params)   # every process starts from process 0's weights
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if schedule == "linear":
        if total_steps is None:
            raise ValueError("schedule='linear' needs total_steps")
        factor = linear_schedule(total_steps, warmup)
    elif schedule == "constant":
        factor = _constant
    elif callable(schedule):
        factor = schedule
    else:
        raise ValueError(f"schedule must be 'constant', 'linear' or a function of the step, got {schedule!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    state = State(graph, model, optimizer)
    start_epoch, last_good = 0, None
    if resume:
        last_good = checkpoint_folder(resume, checkpoint_dir)
        if last_good is not None:
            saved = load_checkpoint(last_good, graph, optimizer, scheduler, settings or {})
            state.history, start_epoch, state.step = saved["history"], saved["epoch"] + 1, saved["step"]
    bar = progress_bar(total=total_steps, initial=state.step, progress=progress and is_main(), desc=desc,
                       delay=0)
    grad_before = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # also when called under torch.no_grad()
    try:
        for epoch in range(start_epoch, epochs):
            state.epoch = epoch
            graph.ops.train()
            todo = list(batches(epoch)) if grad_accum > 1 else batches(epoch)
            n_batches = len(todo) if grad_accum > 1 else None
            optimizer.zero_grad(set_to_none=True)
            running = []
            for b, batch in enumerate(todo):
                for cb in callbacks:
                    cb.on_batch(state, batch)
                value = loss(batch)
                for cb in callbacks:
                    cb.on_loss(state, value, batch)
                if _any_process(state.stop):
                    break
                whole = all_sum(float(value.detach()))     # the batch's loss (this process's part alone: 1 process)
                _check_finite(torch.tensor(whole), "loss", state, batch, last_good)
                group = 1 if n_batches is None else min(grad_accum, n_batches - (b // grad_accum) * grad_accum)
                if value.requires_grad:                    # a process without rows in this batch has no graph
                    (value / group).backward()
                running.append(whole)
                if n_batches is not None and not ((b + 1) % grad_accum == 0 or b + 1 == n_batches):
                    continue
                sum_gradients(params)
                grads = [p.grad for p in params if p.grad is not None]
                norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm is not None
                        else torch.nn.utils.get_total_norm(grads))
                _check_finite(norm, "gradient norm", state, batch, last_good)
                _checked_step(optimizer, params, state, last_good)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                row = {"epoch": epoch, "step": state.step, "loss": sum(running) / len(running),
                       "lr": scheduler.get_last_lr()[0]}
                for cb in callbacks:
                    cb.on_step(state, row)
                state.history.append(row)
                state.step += 1
                running = []
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}")
                if _any_process(state.stop):
                    break
            if eval_fn is not None and state.history:
                graph.ops.eval()
                with torch.no_grad():
                    metrics = (eval_fn(graph, model, epoch) or {}) if is_main() else None
                state.history[-1].update(broadcast_json(metrics))
            if checkpoint_dir is not None:
                last_good = Path(checkpoint_dir) / f"epoch-{epoch}"
                if is_main():
                    save_checkpoint(last_good, graph, model, optimizer, scheduler,
                                    {"epoch": epoch, "step": state.step, "history": state.history,
                                     "settings": settings or {}, "trainable": trainable_nodes(graph)})
                barrier()
            if state.stop:
                break
    finally:
        torch.set_grad_enabled(grad_before)
        bar.close()
        graph.ops.eval()
    return pd.DataFrame(state.history)
