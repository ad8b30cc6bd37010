"""Train a graph's parameters with the language model frozen.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[1], positions="f1+l1", rank=2)
>>> data = rg.data.PromptResponse([("ab", "cd"), ("abc", "d")])
>>> history = rg.train(g, lm, data, epochs=2, batch_size=2, progress=False)
>>> list(history.columns[:4])
['epoch', 'step', 'loss', 'lr']

AdamW with a linear schedule (warm-up, then decay to zero), gradient accumulation,
a seeded data order, an evaluation callback, a checkpoint per epoch, an exact resume from
any of them, a stop on a non-finite loss and an optional frozen-prefix cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .compile import compile_graph
from .data import Classification, PromptResponse, collate_lm
from .graph import Graph
from .io import atomic_dir, load_weights, write_graph
from .ops import Classify
from .prefix import PrefixCache
from .runtime import as_model, forward


class NonFiniteLoss(FloatingPointError):
    """Training met a NaN or infinite loss and stopped before the optimizer step.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.Add(torch.full((32,), float("nan")), trainable=True))
    >>> try:
    ...     train(g, rg.models.tiny("llama"), rg.data.PromptResponse([("ab", "cd")]), progress=False)
    ... except NonFiniteLoss as e:
    ...     print(len(e.history), e.checkpoint)
    0 None

    ``history`` holds the rows of the good steps; ``checkpoint`` the newest good checkpoint
    folder (None without one). The graph keeps the weights of the last good step."""

    def __init__(self, message: str, history: pd.DataFrame, checkpoint: Optional[Path]):
        super().__init__(message)
        self.history = history
        self.checkpoint = checkpoint


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, head=None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (response) tokens.

    >>> logits = torch.zeros(1, 3, 5)            # uniform over 5 tokens
    >>> labels = torch.tensor([[-100, 2, 4]])    # the response: tokens 1 and 2
    >>> math.isclose(lm_loss(logits, labels), math.log(5), rel_tol=1e-6)
    True

    With ``head`` (the model's output embedding), ``logits`` are final hidden states and
    the head runs on the labelled positions only."""
    targets = labels[:, 1:].to(logits.device)
    keep = targets != -100
    scores = logits[:, :-1][keep]
    if head is not None:
        scores = head(scores)
    return torch.nn.functional.cross_entropy(scores.float(), targets[keep])


def _classify_node(graph: Graph) -> str:
    names = [n.name for n in graph.nodes if isinstance(n.op, Classify)]
    if len(names) != 1:
        raise ValueError(f"classification needs exactly one Classify node in the graph, found {names}")
    return names[0]


def _schedule(total: int, warmup: float):
    n_warm = int(round(warmup * total)) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    return factor


# -- checkpoints ---------------------------------------------------------------

def _save_checkpoint(folder: Path, graph, model, optimizer, scheduler, state: dict) -> None:
    with atomic_dir(folder) as tmp:
        write_graph(tmp, graph, model)
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous()
                   for i, s in opt["state"].items() for k, v in s.items()}
        tensors["rng"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda_rng.{i}"] = state
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(state, param_groups=opt["param_groups"], scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    """The newest complete ``epoch-N`` folder (folders appear only once fully written).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in (1, 10, 2):
    ...     (d / f"epoch-{n}").mkdir()
    >>> latest_checkpoint(d).name, latest_checkpoint(d / "none")
    ('epoch-10', None)
    """
    folders = sorted(Path(checkpoint_dir).glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    return folders[-1] if folders else None


def _checkpoint_folder(resume, checkpoint_dir) -> Optional[Path]:
    """``resume=True``: the newest checkpoint in ``checkpoint_dir`` (None when there is none);
    a path: that checkpoint folder, which must exist."""
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        return latest_checkpoint(checkpoint_dir)
    folder = Path(resume)
    if not (folder / "state.json").is_file():
        found = [p.name for p in Path(folder.parent).glob("epoch-*")] if folder.parent.is_dir() else []
        raise ValueError(f"resume={str(resume)!r} is not a checkpoint folder (no state.json); "
                         f"checkpoints beside it: {sorted(found) or 'none'}")
    return folder


def _load_checkpoint(folder: Path, graph, optimizer, scheduler, settings: dict) -> dict:
    state = json.loads((folder / "state.json").read_text())
    saved = state.get("settings", {})
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v}
    if changed:
        raise ValueError(f"cannot resume exactly from {folder}: it was trained with other settings ("
                         + ", ".join(f"{k}={a!r}, now {b!r}" for k, (a, b) in changed.items())
                         + "); pass the same ones")
    load_weights(graph, load_file(str(folder / "weights.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_rng.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


# -- the loop ------------------------------------------------------------------

def train(graph: Graph, model, data, *, epochs: int = 3, batch_size: int = 8, lr: float = 4e-3,
          weight_decay: float = 0.0, warmup: float = 0.1, grad_accum: int = 1, seed: int = 0,
          max_grad_norm: Optional[float] = 1.0, eval_fn: Optional[Callable] = None,
          checkpoint_dir=None, resume: Union[bool, str, Path] = False, progress: bool = True,
          padding_side: str = "right", max_length: Optional[int] = None, shuffle: bool = True,
          cache_prefix: bool = False) -> pd.DataFrame:
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

    A NaN or infinite loss (or gradient) stops training before the optimizer step with
    :class:`NonFiniteLoss`; the graph keeps its last good weights and checkpoints stay as
    they were.
    """
    model = as_model(model)
    plan = compile_graph(graph, model.arch)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    params = [p for p in graph.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the graph has no trainable parameters")
    if any(p.requires_grad for p in model.hf.parameters()):
        raise ValueError("the language model has trainable parameters; freeze it (rg.wrap freezes by default)")
    classify = _classify_node(graph) if isinstance(data, Classification) else None
    if not isinstance(data, (PromptResponse, Classification)):
        raise TypeError("data must be reftgraph.data.PromptResponse or Classification")
    prompts = data.prompts(model)
    n = len(prompts)
    batches_per_epoch = (n + batch_size - 1) // batch_size
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)  # a partial group at the end steps too
    total_steps = steps_per_epoch * epochs
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, warmup))
    history, start_epoch, step = [], 0, 0
    if cache_prefix and shuffle and batch_size < n:
        raise ValueError(f"cache_prefix=True needs batches that repeat every epoch; with shuffle=True and "
                         f"batch_size {batch_size} < {n} rows they change: pass shuffle=False or "
                         f"batch_size >= {n}")
    cache = PrefixCache(model, max_entries=batches_per_epoch) if cache_prefix else None
    settings = {"rows": n, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "warmup": warmup, "grad_accum": grad_accum, "seed": seed, "max_grad_norm": max_grad_norm,
                "shuffle": shuffle, "padding_side": padding_side, "max_length": max_length}
    last_good = None
    if resume:
        last_good = _checkpoint_folder(resume, checkpoint_dir)
        if last_good is not None:
            state = _load_checkpoint(last_good, graph, optimizer, scheduler, settings)
            history, start_epoch, step = state["history"], state["epoch"] + 1, state["step"]
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    graph.ops.train()
    grad_before = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # also when called under torch.no_grad()
    try:
        for epoch in range(start_epoch, epochs):
            order = list(range(n)) if not shuffle else torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
            optimizer.zero_grad(set_to_none=True)
            running = []
            for b in range(batches_per_epoch):
                rows = sorted(order[b * batch_size:(b + 1) * batch_size])  # one batch, one content
                loss = _batch_loss(plan, model, data, prompts, rows, classify, padding_side, max_length, cache)
                _check_finite(loss, "loss", epoch, step, rows, history, last_good)
                group = min(grad_accum, batches_per_epoch - (b // grad_accum) * grad_accum)
                (loss / group).backward()
                running.append(float(loss.detach()))
                if (b + 1) % grad_accum == 0 or b + 1 == batches_per_epoch:
                    grads = [p.grad for p in params if p.grad is not None]
                    norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm is not None
                            else torch.nn.utils.get_total_norm(grads))
                    _check_finite(norm, "gradient norm", epoch, step, rows, history, last_good)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    history.append({"epoch": epoch, "step": step, "loss": sum(running) / len(running),
                                    "lr": scheduler.get_last_lr()[0]})
                    step += 1
                    running = []
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{history[-1]['loss']:.4f}")
            if eval_fn is not None:
                graph.ops.eval()
                with torch.no_grad():
                    history[-1].update(eval_fn(graph, model, epoch) or {})
                graph.ops.train()
            if checkpoint_dir is not None:
                last_good = Path(checkpoint_dir) / f"epoch-{epoch}"
                _save_checkpoint(last_good, graph, model, optimizer, scheduler,
                                 {"epoch": epoch, "step": step, "history": history, "seed": seed,
                                  "settings": settings})
    finally:
        torch.set_grad_enabled(grad_before)
        bar.close()
        graph.ops.eval()
    return pd.DataFrame(history)


def _check_finite(value: torch.Tensor, what: str, epoch: int, step: int, rows, history, last_good) -> None:
    if bool(torch.isfinite(value.detach()).all()):
        return
    where = (f"the last good checkpoint is {last_good}" if last_good is not None
             else "no checkpoint was written (pass checkpoint_dir= to keep one per epoch)")
    raise NonFiniteLoss(
        f"training stopped: the {what} is {float(value.detach())} at epoch {epoch}, step {step} (data rows "
        f"{rows}); the optimizer step was not taken, so the graph keeps its weights from the last good "
        f"step; {where}. Lower lr, clip gradients (max_grad_norm) or check the graph's ops and the data.",
        pd.DataFrame(history), last_good)


def _batch_loss(plan, model, data, prompts, rows, classify, padding_side, max_length, cache=None):
    responses = None if classify else [data.responses[i] for i in rows]
    inputs, batch, labels = collate_lm(model, [prompts[i] for i in rows], responses,
                                       padding_side=padding_side, max_length=max_length)
    if cache is not None:
        value, collected = cache.forward(plan, inputs, batch, hidden=True)
    else:
        value, collected = forward(plan, model, inputs, batch, hidden=True)
    if classify:
        target = torch.tensor([data.labels[i] for i in rows], device=value.device)
        return torch.nn.functional.cross_entropy(collected[classify][0].float(), target)
    return lm_loss(value, labels, head=model.hf.get_output_embeddings())
