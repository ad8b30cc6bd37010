"""Run a graph: tokenize every stream into one batch, compile, and trace once.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Patch(source="source"))
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="f1+l1"), rg.Collect(), name="m")
>>> out = g.run(lm, ["a cat", "the dog"], sources={"source": ["one", "two"]})
>>> out["m"].shape, out.next_token_logits.shape
(torch.Size([2, 2, 32]), torch.Size([2, 259]))
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import nnsight
import torch

from ..arch.components.pattern import eager
from ..arch.structure import Hook
from .bind import Batch, bind, with_subspaces
from .plan import Plan, compile_graph
from .apply import apply
from .remote import INSIDE, check as check_remote, is_remote, shipped
from ..core.graph import Graph
from ..arch.models import Model
from ..errors import DataError, RemoteError, SiteError

Prompts = Union[str, Sequence[str]]


@dataclass
class RunResult:
    """What a run returns: the base stream's logits and the collected activations.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0, positions="prompt"), rg.Collect(), name="r")
    >>> out = g.run(rg.models.tiny("llama"), ["abcd", "ab"])
    >>> out.logits.shape, out["r"].shape, out.valid["r"].tolist()   # row 1 has 2 tokens
    (torch.Size([2, 4, 259]), torch.Size([2, 4, 32]), [[True, True, True, True], [True, True, False, False]])

    ``result[name]`` is node ``name``'s collected slice ``[B, k, ...]``;
    ``result.valid[name]`` marks the real positions of rows with fewer than ``k``.
    """

    logits: torch.Tensor
    collected: dict
    valid: dict
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: dict
    last_index: torch.Tensor
    stream_logits: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.collected:
            raise KeyError(f"no collected node {name!r}; collected: {sorted(self.collected)}")
        return self.collected[name]

    @property
    def next_token_logits(self) -> torch.Tensor:
        """``[B, vocab]``: the base stream's logits at each row's last prompt token.

        >>> import reftgraph as rg
        >>> out = rg.Graph().run(rg.models.tiny("llama"), ["abcd", "ab"])
        >>> torch.equal(out.next_token_logits[1], out.logits[1, 1])   # "ab": 2 tokens, right-padded
        True
        """
        rows = self.rows["base"]
        return self.logits[torch.arange(self.logits.shape[0]), self.last_index[rows]]

    def __repr__(self) -> str:
        shape = (lambda t: "[" + ", ".join(map(str, t.shape)) + "]")
        collected = ", ".join(f"{name} {shape(value)}" for name, value in self.collected.items()) or "nothing"
        streams = ", ".join(f"{name} {len(range(*rows.indices(len(self.input_ids))))}"
                            for name, rows in self.rows.items())
        return f"RunResult(logits {shape(self.logits)}; collected: {collected}; rows per stream: {streams})"

    def _repr_html_(self) -> str:
        import html

        shape = (lambda t: " x ".join(map(str, t.shape)))
        cells = [("logits (base stream)", shape(self.logits), "[rows, positions, vocab]")]
        for name, value in self.collected.items():
            short = int((~self.valid[name]).any(-1).sum()) if name in self.valid else 0
            cells.append((f"[{name!r}]", shape(value), f"{short} rows with fewer positions (see .valid)" if short
                          else "[rows, positions, ...]"))
        top = self.next_token_logits.argmax(-1)[:8].tolist()
        streams = ", ".join(f"{name}: {len(range(*rows.indices(len(self.input_ids))))} rows"
                            for name, rows in self.rows.items())
        body = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{html.escape(c)}</td></tr>" for a, b, c in cells)
        return (f"<p><b>RunResult</b> ({html.escape(streams)}); next token ids (argmax) of the base rows: "
                f"{top}{' ...' if len(self.next_token_logits) > 8 else ''}</p>"
                f"<table><tr><th>value</th><th>shape</th><th></th></tr>{body}</table>")


def prompt_list(prompts: Prompts, what: str) -> list:
    """``prompts`` as a list of strings (one string is a list of one), else a DataError.

    >>> prompt_list("hi", "prompts"), prompt_list(("a", "b"), "prompts")
    (['hi'], ['a', 'b'])
    """
    if isinstance(prompts, str):
        return [prompts]
    given = type(prompts).__name__
    prompts = list(prompts) if hasattr(prompts, "__iter__") and not isinstance(prompts, dict) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)][:1]
        raise DataError(f"{what} must be a non-empty list of strings, got {given}"
                        + (f" holding a {bad[0]}" if bad else " (empty)" if given in ("list", "tuple") else ""))
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{what}[{i}] is not valid text: {e.reason} at character {e.start} "
                            f"({p[e.start]!r}); a lone surrogate cannot be tokenized") from None
    return prompts


def tokenize(model: Model, streams: dict, padding_side: Optional[str] = None):
    """Tokenize ``{stream: prompts}`` into one padded batch; returns (inputs, Batch).

    >>> import reftgraph as rg
    >>> inputs, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "abcd"], "source": ["x"]}, "right")
    >>> inputs["input_ids"].shape, batch.rows["source"], batch.length.tolist()
    (torch.Size([3, 4]), slice(2, 3, None), [2, 4, 1])
    """
    if padding_side not in (None, "left", "right"):
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts, rows = [], {}
    for name, prompts in streams.items():
        rows[name] = slice(len(texts), len(texts) + len(prompts))
        texts += prompts
    tok = model.tokenizer
    side = padding_side or tok.padding_side
    memo = _TOKENIZED.get(tok)
    if memo is None:
        memo = _TOKENIZED[tok] = OrderedDict()
    key = (side, tuple(texts))
    entry = memo.get(key)
    if entry is None or entry[-1] != len(tok):   # new prompts, or tokens were added since: encode
        if entry is not None:
            memo.clear()
        entry = memo[key] = _encode(tok, texts, side)
        if len(memo) > MAX_TOKENIZED:
            memo.popitem(last=False)
    ids, mask, start, length, seq_len, ragged, _ = entry
    limit = model.arch.max_tokens
    if limit is not None and seq_len > limit:
        row = int(length.argmax())
        raise DataError(f"prompt {row} is {int(length[row])} tokens; {model.name or model.arch.family.name} has "
                        f"learned position embeddings for {limit} tokens at most: shorten it")
    side_failed = model.arch.padding.get(side) if ragged else None
    if side_failed:
        raise DataError(f"{model.name or model.arch.family.name} cannot run prompts of different lengths "
                        f"padded on the {side}: {side_failed}; use padding_side="
                        f"{'right' if side == 'left' else 'left'!r} or prompts of one length")
    # copies: a caller editing a result in place never changes what later runs get
    inputs = model.arch.inputs(ids.clone(), mask.clone())
    return inputs, Batch(rows, start.clone(), length.clone(), seq_len)


# the last tokenized batches per tokenizer: a graph run again on the same prompts skips the tokenizer
_TOKENIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_TOKENIZED = 32


def _encode(tok, texts: list, side: str):
    # padded here, not by the tokenizer: setting its padding_side would race with other threads
    rows = tok(texts, padding=False)["input_ids"]
    length = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if bool((length == 0).any()):
        raise DataError("an empty prompt tokenizes to no tokens; every prompt needs at least one")
    width = int(length.max())
    ids = torch.full((len(rows), width), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        mask[i, at] = 1
    # the tokenizer's size comes last: tokens added later make the entry stale
    return ids, mask, mask.argmax(1), length, width, bool((length != width).any()), len(tok)


def run(graph: Graph, model: Model, prompts: Prompts, sources: Optional[dict] = None,
        padding_side: Optional[str] = None, grad: Optional[bool] = None, remote=None,
        subspaces=None) -> RunResult:
    """Run ``graph`` on ``prompts`` with named ``sources`` (stream -> prompts) in one forward.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Patch("source"))
    >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect(), name="x")
    >>> out = run(g, rg.models.tiny("llama"), ["ab", "cd"], sources={"source": ["b"]})
    >>> torch.equal(out["x"][0], out["x"][1])   # one source prompt, used for both rows
    True

    Everything is checked before the forward pass: the graph against the model, the
    streams the graph reads against ``sources``, and every position against every row.
    A source with one prompt is used for every base row. Gradients flow to the graph's
    parameters when any requires grad (``grad=`` forces it on or off).

    ``remote=True`` runs the trace on NDIF (the model loaded by its Hugging Face id, e.g.
    ``rg.load(id, dispatch=False)``), ``remote="local"`` in nnsight's local simulation of
    it (see :mod:`reftgraph.engine.remote`); the logits and the collected values come back.

    ``subspaces`` chooses, per call or per row, the dims of each learned basis (ReFT ops,
    ``Rotate``) the edit uses: ``[0, 1, 2, 3]`` for every row, ``[[0, 1], [2, 3]]`` one per
    row, ``{"node": ...}`` per node (see :func:`reftgraph.engine.bind.with_subspaces`).
    """
    model = as_model(model)
    plan = compile_graph(graph, model.arch)
    check_remote(remote, model, graph)
    base = prompt_list(prompts, "prompts")
    streams = {"base": base}
    if sources is not None and not isinstance(sources, dict):
        raise DataError(f"sources must be a dict {{stream name: prompts}}, e.g. sources={{'source': [...]}}; "
                        f"got {type(sources).__name__}")
    for name, src in (sources or {}).items():
        src = prompt_list(src, f"sources[{name!r}]")
        if len(src) == 1 and len(base) > 1:
            src = src * len(base)
        streams[name] = src
    unused = set(streams) - graph.streams - {"base"}
    if unused:
        raise SiteError(f"sources {sorted(unused)} are not read by any node of the graph "
                        f"(streams it uses: {sorted(graph.streams)})")
    inputs, batch = tokenize(model, streams, padding_side)
    if grad and is_remote(remote):
        raise RemoteError("gradients do not come back from a remote run; train locally (or pass grad=False)")
    if grad is None:
        grad = not is_remote(remote) and any(p.requires_grad for p in graph.parameters())
    with torch.set_grad_enabled(grad), inference_mode(graph):
        logits, collected = forward(plan, model, inputs, batch, remote=remote, subspaces=subspaces)
    last = batch.start + batch.length - 1
    return RunResult(
        logits=logits[batch.rows["base"]],
        collected={k: v[0] for k, v in collected.items()},
        valid={k: v[1] for k, v in collected.items()},
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        rows=batch.rows,
        last_index=last.to(logits.device),
        stream_logits={name: logits[rows] for name, rows in batch.rows.items()},
    )


def forward(plan: Plan, model: Model, inputs: dict, batch: Batch, hidden: bool = False, prefix=None, cache=None,
            stop: bool = False, remote=None, subspaces=None):
    """One traced forward of ``inputs`` with the plan's edits: ``(logits, {name: (value, valid)})``.

    >>> import reftgraph as rg
    >>> from reftgraph.engine.plan import compile_graph
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> hidden, collected = forward(compile_graph(g, lm.arch), lm, inputs, batch, hidden=True)
    >>> hidden.shape, collected["m"][0].shape
    (torch.Size([2, 3, 32]), torch.Size([2, 1, 32]))

    Positions are bound (and checked) against ``batch`` before the model runs. With
    ``hidden=True`` the first value is the final hidden state ``[B, S, d]`` (after the
    final norm) and the language-model head runs on the last position only: a loss on
    a few positions then pays for those alone (see :func:`reftgraph.training.losses.lm_loss`).
    ``prefix=(layer, value)`` skips the blocks below ``layer``, feeding ``value`` (their
    output, computed earlier) to block ``layer``: see :mod:`reftgraph.engine.prefix`; with
    ``cache`` (a :class:`~reftgraph.engine.prefix.PrefixCache`) the cache supplies them.
    With ``stop=True`` the model stops after the plan's last hook (the first value is None):
    what a caller collects below the top layer then costs only the blocks up to it.
    Other entries of ``inputs`` (``logits_to_keep``, a key-value ``cache``) go to the model.
    With ``remote`` (checked by the caller: :func:`reftgraph.engine.remote.check`) the trace
    runs remotely and only the first value and the collected values come back. ``subspaces``:
    per-row subspaces (see :func:`reftgraph.engine.bind.with_subspaces`)."""
    if hidden and any("logits" in (s.node.site.component, s.node.reads[1].component) for s in plan.steps):
        raise SiteError("this graph edits or reads logits, which a run for the final hidden state (a training loss) "
                        "does not compute for every position; use logits_in (the stream before the final norm)")
    if cache is not None:
        return cache.forward(plan, inputs, batch, hidden=hidden, model=model, subspaces=subspaces)
    bound = with_subspaces(plan, bind(plan, batch), batch, subspaces)
    remote = remote if is_remote(remote) else None
    sent = remote is not None and remote != INSIDE   # this trace is a request of its own
    device = input_device(model, [plan], remote)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if hidden:
        inputs["logits_to_keep"] = 1
    trunk = getattr(model.nn, model.arch.family.layers.split(".")[0])
    collected, out = {}, {}
    lock = contextlib.nullcontext() if remote == INSIDE else serial(model)
    with lock, attention_for(model, plan), model.nn.trace(inputs, **({"remote": remote} if sent else {})) as tracer:
        for layer in range(prefix[0] if prefix is not None else 0):
            model.arch.envoy(model.nn, Hook(layer, 0, "", "output")).skip(prefix[1])
        apply(plan, bound, model.nn, collected)
        if stop:
            tracer.stop()
        if hidden:
            out["value"] = trunk.output[0]
        else:
            out["value"] = model.nn.output.logits
        if sent:   # what comes back from the server: the saved values only
            nnsight.save(collected)
            nnsight.save(out)
    return out.get("value"), collected


def last_token(values: torch.Tensor, batch: Batch, stream: str = "base") -> torch.Tensor:
    """``values[N, S, ...]`` at the last prompt token of each row of ``stream``: ``[rows, ...]``.

    >>> import reftgraph as rg
    >>> inputs, batch = tokenize(rg.models.tiny("llama"), {"base": ["ab", "cde"]}, "right")
    >>> last_token(inputs["input_ids"][..., None], batch)[:, 0].tolist()    # "b" and "e"
    [68, 71]
    """
    rows = batch.rows[stream]
    last = (batch.start + batch.length - 1)[rows]
    return values[rows][torch.arange(len(last)), last.to(values.device)]


def forwards(model: Model, jobs: Sequence[tuple], remote=None) -> list:
    """Several traced forwards, ``jobs`` of ``(plan, inputs, batch, reduce)``: each job's
    ``reduce(logits, collected)``, in order.

    >>> import reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> inputs, batch = tokenize(lm, {"base": ["ab", "cde"]})
    >>> job = (compile_graph(g, lm.arch), inputs, batch, lambda logits, collected: logits[:, -1].argmax(-1))
    >>> torch.equal(*forwards(lm, [job, job])), torch.equal(*forwards(lm, [job, job], remote="local"))
    (True, True)

    With ``remote`` (checked by the caller) every forward runs in one nnsight session (one
    request) and ``reduce`` runs on the server, so only its results come back: reduce
    the logits to what the caller needs (a metric's value, the last position)."""
    if not is_remote(remote):
        return [reduce(*forward(plan, model, inputs, batch)) for plan, inputs, batch, reduce in jobs]
    light = shipped(model)
    with serial(model), model.nn.session(remote=remote):
        results = _reduced(light, jobs)
        nnsight.save(results)
    return results


def _reduced(model: Model, jobs) -> list:
    """The forwards of a remote session (run by the server)."""
    return [reduce(*forward(plan, model, inputs, batch, remote=INSIDE)) for plan, inputs, batch, reduce in jobs]


def attention_for(model: Model, *plans):
    """The attention implementation the plans need while they run: eager when one touches
    ``attn_pattern`` (only eager attention computes the probabilities), put back after;
    else the model's own.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("attn_pattern", layer=0, head=0), rg.Collect(), name="p")
    >>> with attention_for(lm, compile_graph(g, lm.arch)):
    ...     lm.hf.config._attn_implementation
    'eager'
    >>> lm.hf.config._attn_implementation
    'sdpa'
    """
    if model.hf is None or not any(plan.eager for plan in plans):
        return contextlib.nullcontext()
    return eager(model.hf)


def serial(model: Model):
    """The lock that runs on ``model`` take, one at a time: a re-entrant lock kept on the
    transformers model (shared by every wrapper of it).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> serial(lm) is serial(rg.wrap(lm.hf, lm.tokenizer))
    True

    nnsight traces and forward hooks are not safe to run on one model from two threads
    at once; reftgraph serialises them, so threads sharing a model wait for each other
    (and get the results they would get alone). For parallel work, give each thread or
    process its own model.
    """
    # dict.setdefault is atomic: two threads asking first get the same lock (no global
    # registry, which would travel with every remote request that ships this module)
    lock = model.hf.__dict__.get("_reftgraph_lock")
    return lock if lock is not None else model.hf.__dict__.setdefault("_reftgraph_lock", threading.RLock())


@contextlib.contextmanager
def inference_mode(graph: Graph):
    """Ops in eval mode (no dropout) for a run, their previous mode restored after.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=0), rg.LoReFT(width=32, rank=2, dropout=0.1), name="r")
    >>> _ = g.ops.train()
    >>> with inference_mode(g):
    ...     print(g["r"].op.training)
    False
    >>> g["r"].op.training
    True
    """
    training = [m for m in graph.ops.modules() if m.training]
    for m in training:   # eval(), without a walk per module (and without bumping an op's revision)
        object.__setattr__(m, "training", False)
    try:
        yield
    finally:
        for m in training:
            object.__setattr__(m, "training", True)


def runnable(model: Model) -> torch.device:
    """The device ``model`` runs on, or a :class:`SiteError` when it has no weights (meta device).

    >>> import tempfile, reftgraph as rg
    >>> path = tempfile.mkdtemp()
    >>> rg.models.tiny_config("llama").save_pretrained(path); _ = rg.models.tiny_tokenizer().save_pretrained(path)
    >>> runnable(rg.load(path, dispatch=False))       # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: model ... has no weights (built on the meta device, rg.load(..., dispatch=False)): ...
    """
    device = model.device
    if device.type == "meta":
        raise SiteError(f"model {model.name or type(model.hf).__name__} has no weights (built on the meta device, "
                        "rg.load(..., dispatch=False)): graphs compile and are checked against it, but running "
                        "one needs the weights: rg.load(name_or_path)")
    return device


def input_device(model: Model, plans: Sequence[Plan], remote=None) -> torch.device:
    """Where a forward's inputs go: the model's device, with the plans' ops placed on their
    layers' devices; the CPU for a remote call (the server holds the weights, so a model
    loaded without them works too).

    >>> import reftgraph as rg
    >>> input_device(rg.models.tiny("llama"), []), input_device(rg.models.tiny("llama"), [], remote="local")
    (device(type='cpu'), device(type='cpu'))
    """
    if remote is not None:
        return torch.device("cpu")
    device = runnable(model)
    for plan in plans:
        place(plan, model, device)
    return device


def layer_device(model: Model, layer: int) -> torch.device:
    """The device block ``layer`` computes on (under accelerate's device map: its execution device).

    >>> import reftgraph as rg
    >>> layer_device(rg.models.tiny("llama"), 1)
    device(type='cpu')
    """
    if not getattr(model.hf, "hf_device_map", None):   # one device: no need to look at the block
        return model.device
    block = model.arch.envoy(model.hf, Hook(layer, 0, "", "output"))
    execution = getattr(getattr(block, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    weights = [p.device for p in block.parameters() if p.device.type != "meta"]
    return weights[0] if weights else model.device


def place(plan: Plan, model: Model, device: Optional[torch.device] = None) -> None:
    """Move each op of ``plan`` to the device of the layer it edits (once; parameters keep their identity).

    >>> import torch, reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1), rg.Add(torch.zeros(32)), name="a")
    >>> place(compile_graph(g, lm.arch), lm); g["a"].op.vector.device
    device(type='cpu')

    ``device``: the model's device when the caller has it (a model on one device).
    """
    mapped = None
    for step in plan.steps:
        op = step.node.op
        # the op's own first tensor, else the first of its submodules'
        tensor = next((t for t in (*op._parameters.values(), *op._buffers.values()) if t is not None), None)
        if tensor is None:
            tensor = next(iter(op.parameters()), None)
        if tensor is None:
            tensor = next(iter(op.buffers()), None)
        if tensor is not None:
            if mapped is None:
                mapped = bool(getattr(model.hf, "hf_device_map", None))
                device = model.device if device is None and not mapped else device
            wanted = layer_device(model, step.hook.layer) if mapped else device
            if tensor.device != wanted:
                op.to(wanted)


def as_model(model) -> Model:
    """``model`` itself when it is a :class:`Model`, else a :class:`SiteError` that says how to make one.

    >>> import reftgraph as rg
    >>> as_model(rg.models.tiny("llama").hf)      # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: expected a reftgraph Model (rg.load(...), ...), got LlamaForCausalLM
    """
    if not isinstance(model, Model):
        raise SiteError(f"expected a reftgraph Model (rg.load(...), rg.wrap(hf_model, tokenizer)), "
                        f"got {type(model).__name__}")
    return model
