"""Batched activation-patching sweeps -> a tidy DataFrame.

Every condition (a layer, a position or all positions, a head) is one patched run:
the source run's activation written into the base run. Instead of one forward per
condition, conditions at the same layer run as rows of one batch, and each row
computes only what differs from the base run: the layers below the patched one are
skipped (their output is the base run's), and the tokens before the earliest patched
position come from the base run's key-value cache. Conditions stream in chunks sized
to ``memory_mb``.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
>>> df = rg.patching.sweep(lm, data, "resid_pre", positions=[-2, -1])
>>> df[["layer", "position", "token"]].values.tolist()
[[0, -2, "' '"], [0, -1, "'d'"], [1, -2, "' '"], [1, -1, "'d'"]]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import pandas as pd
import torch

from ...core.graph import Graph
from ...core.ops import Collect, Patch, Set
from ...core.settings import Settings, number, option
from ...core.sites import COMPONENTS, END_COMPONENTS, HEAD_COMPONENTS, Site, resolve_positions
from ...engine import Batch, Job, Local, Skip, as_model, compile_graph, executor, last_token, runnable, tokenize
from ...errors import DataError, SiteError
from ...viz.progress import progress_bar
from ..forwards import run_jobs
from ...training.counterfactual import Counterfactual
from .metrics import METRICS, Reference, get_metric, restoration

__all__ = ["SweepConfig", "sweep"]

WHOLE_SEQUENCE = ("attn_out", "mlp_out", "head_out")


@dataclass
class Runs:
    """The unpatched base and source runs a sweep compares against."""

    inputs: dict          # base inputs, left-padded
    cache: object         # base run's key-value cache
    hidden: tuple         # base run's block inputs: hidden[l] = resid_pre[l]
    base_logits: torch.Tensor
    source_logits: torch.Tensor
    ref: Reference
    source_values: dict   # (component, layer, position) -> ([B, k, ...], valid)


def _component(v):
    names = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [None]
    bad = [c for c in names if c not in COMPONENTS]
    return f"must be a component or a list of them ({', '.join(COMPONENTS)}), got {bad[0]!r}" if bad else None


@dataclass(frozen=True)
class SweepConfig(Settings):
    """The settings of :func:`sweep`, with their help.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d"], ["ab d c"], correct=["c"], wrong=["d"])
    >>> len(sweep(lm, data, progress=False, **SweepConfig(component="mlp_out", layers=[1]).kwargs()))
    1
    """

    component: object = option("resid_pre", "the component (or a list of them) to patch, one condition at a "
                               "time", _component)
    layers: object = option(None, "layers to patch (null: every layer)")
    positions: object = option(None, "token positions, relative to each prompt (negative: from its end), or "
                               "'all' (one condition patching every position); null: the component's default")
    heads: object = option(None, "for head components, the heads to patch one at a time (null: all)")
    metric: str = option("logit_diff", "what each condition measures", lambda v: None if v in METRICS or callable(v)
                         else f"must be one of {', '.join(METRICS)} or a function, got {v!r}")
    memory_mb: float = option(1024, "memory a forward may use: conditions batched per forward",
                              number(0, low_open=True))


def sweep(model, data: Counterfactual, component: Union[str, Sequence[str]] = "resid_pre",
          layers: Optional[Sequence[int]] = None, positions=None, heads=None,
          metric="logit_diff", memory_mb: float = 1024, remote=None, progress: bool = True) -> pd.DataFrame:
    """Patch every (layer x position x head) of ``component`` from the source into the base.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> df = sweep(lm, data, "head_out", layers=[1])
    >>> df[["layer", "position", "head"]].values.tolist(), round(df.attrs["source"] - df.attrs["base"], 3) != 0
    ([[1, 'all', 0], [1, 'all', 1], [1, 'all', 2], [1, 'all', 3]], True)

    ``positions``: ints relative to each prompt (negative from its end), or ``"all"`` for
    one condition patching every position (the default for ``attn_out``, ``mlp_out`` and
    ``head_out``; residual components default to every position of the shortest prompt).
    ``heads``: for ``head_out``/``q``/``k``/``v``, the heads to patch one at a time
    (default all). ``metric``: ``"logit_diff"``, ``"prob"``, ``"loss"``, ``"kl"`` or
    ``f(logits, ref) -> [B]``. Returns one row per condition with the metric's mean over
    the data (``value``) and the normalised ``restoration`` (0 = base run, 1 = source run).

    ``remote`` (``True`` for NDIF, ``"local"`` for nnsight's simulation): one nnsight session
    (one request) of a few traces, each running many conditions as streams beside the base
    and source prompts (as many as ``memory_mb`` allows); only the metric's means come back.
    A progress bar counts the conditions (remotely: the traces); ``progress=False`` hides it.
    """
    model = as_model(model, one_stack="rg.patching.sweep")
    if not isinstance(data, Counterfactual):
        raise DataError(f"sweep takes a rg.patching.Counterfactual, got {type(data).__name__}")
    components = [component] if isinstance(component, str) else list(component)
    metric_name, metric_fn = get_metric(metric)
    conditions = {c: sweep_conditions(model, data, c, layers, positions, heads) for c in components}
    ex = executor(model, remote)
    if ex.remote is not None:   # a server cannot reuse the base run's cache: conditions as streams
        base, source, patched = streamed_values(ex, data, conditions, metric_fn, memory_mb, progress)
    else:   # here: every condition reuses the base run's key-value cache and block outputs
        runs = base_and_source_runs(model, data, conditions)
        base = metric_fn(runs.base_logits, runs.ref).mean().item()
        source = metric_fn(runs.source_logits, runs.ref).mean().item()
        with progress_bar(total=sum(map(len, conditions.values())), desc="sweep", progress=progress,
                          unit="condition") as bar:
            patched = {c: patched_values(model, runs, c, conditions[c], metric_fn, memory_mb, bar)
                       for c in components}
    frames = []
    for c in components:
        values = patched[c]
        df = pd.DataFrame([{"component": c, "layer": layer, "position": pos, "token": tok, "head": head}
                           for layer, pos, tok, head in conditions[c]])
        df["metric"], df["value"] = metric_name, values
        df["restoration"] = restoration(df["value"], base, source)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(metric=metric_name, base=base, source=source)
    return out


def sweep_conditions(model, data, component, layers, positions, heads) -> list:
    """``[(layer, position, token label, head)]`` of a sweep over ``component``, checked
    against the model and the data (also what :func:`~reftgraph.patching.attribute` estimates)."""
    arch = model.arch
    if component not in COMPONENTS:
        raise SiteError(f"unknown component {component!r}; valid components: {', '.join(COMPONENTS)}")
    all_layers = [END_COMPONENTS[component]] if component in END_COMPONENTS else list(range(arch.n_layers))
    layers = all_layers if layers is None else [int(x) for x in layers]
    for layer in layers:
        if arch.layer_index(layer) is None:
            raise SiteError(f"sweep over {component}: layer {layer} out of range; valid layers "
                            f"0..{arch.n_layers - 1} (or -{arch.n_layers}..-1)")
    layers = [arch.layer_index(x) for x in layers]
    if component in HEAD_COMPONENTS:
        n = arch.heads(component)
        heads = list(range(n)) if heads is None else [int(h) for h in ([heads] if isinstance(heads, int) else heads)]
        bad = [h for h in heads if not 0 <= h < n]
        if bad:
            raise SiteError(f"sweep over {component}: head {bad[0]} out of range; valid heads 0..{n - 1}")
    elif heads is not None:
        raise SiteError(f"{component} has no heads; heads= is only for {', '.join(HEAD_COMPONENTS)}")
    else:
        heads = [None]
    lengths = _lengths(model, data)
    if positions is None:
        positions = "all" if component in WHOLE_SEQUENCE else list(range(-int(lengths.min()), 0))
    if positions == "all":
        if not torch.equal(lengths[0], lengths[1]):
            row = int((lengths[0] != lengths[1]).nonzero()[0])
            raise DataError(f"positions='all' patches every token, but base and source of row {row} have "
                            f"{int(lengths[0, row])} and {int(lengths[1, row])} tokens; pick positions "
                            "(e.g. negative ones, counted from the end)")
        positions, labels = ["all"], ["all"]
    else:
        positions = [positions] if isinstance(positions, int) else list(positions)
        for stream, n in zip(("base", "source"), lengths):
            resolve_positions(tuple(positions), torch.zeros_like(n), n, f"sweep over {component}, {stream} prompts: ")
        ids = model.tokenizer(data.base[0])["input_ids"]
        labels = [repr(model.tokenizer.decode([ids[p]])) for p in positions]
    return [(layer, pos, label, head) for layer in layers for pos, label in zip(positions, labels) for head in heads]


def streamed_values(ex: Local, data: Counterfactual, conditions: dict, metric_fn, memory_mb: float = 1024,
                    progress: bool = False) -> tuple:
    """``(base, source, {component: [value per condition]})`` from the executor ``ex`` (for a
    remote one: one session). The conditions run as streams of a few traces, as many per
    trace as ``memory_mb`` allows: each condition is a stream of the base prompts whose site
    reads the source stream, and the metric's means over the rows are reduced where the
    forwards run (on the server).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c"], ["ab d"], correct=["c"], wrong=["d"])
    >>> from reftgraph.engine import executor
    >>> base, source, values = streamed_values(executor(lm, "local"), data, {"mlp_out": [(1, "all", None, None)]},
    ...                                        get_metric("logit_diff")[1])
    >>> len(values["mlp_out"]), base != source
    (1, True)
    """
    model = ex.model
    items = [(component, cond) for component, conds in conditions.items() for cond in conds]
    rows = int(memory_mb * 2**20 // row_bytes(model, int(_lengths(model, data).max())))
    per_trace = max(1, rows // len(data) - 2)      # the base and source streams come in every trace
    chunks = [items[lo:lo + per_trace] for lo in range(0, len(items), per_trace)] or [[]]
    correct, wrong = data.answer_ids(model, required=False)
    jobs = [_conditions_job(model, data, chunk, metric_fn, correct, wrong) for chunk in chunks]
    results = run_jobs(ex, jobs, progress=progress, desc="sweep (remote traces)" if ex.remote else "sweep (traces)")
    values = {c: [] for c in conditions}
    for chunk, (_, _, chunk_values) in zip(chunks, results):
        for (component, _), value in zip(chunk, chunk_values):
            values[component].append(value)
    return results[0][0], results[0][1], values


def _conditions_job(model, data: Counterfactual, chunk: list, metric_fn, correct, wrong) -> tuple:
    """One trace of several conditions, each on a stream of its own: a :class:`Job` whose
    ``reduce`` gives the base and source means and each condition's mean."""
    g, streams = Graph(), {"base": data.base, "source": data.source}
    for i, (component, (layer, pos, _, head)) in enumerate(chunk):
        streams[f"c{i}"] = data.base
        site = Site(component, layer, positions="all" if pos == "all" else (pos,),
                    head=None if head is None else (head,))
        g.add(site, Patch("source"), name=f"c{i}", stream=f"c{i}")
    inputs, batch = tokenize(model, streams, "left")
    names = [f"c{i}" for i in range(len(chunk))]

    def reduce(logits, collected):   # on the server: the metric's means over the rows
        ref = Reference(correct, wrong, last_token(logits, batch, "source"))
        mean = (lambda stream: float(metric_fn(last_token(logits, batch, stream), ref).mean()))
        return mean("base"), mean("source"), [mean(name) for name in names]

    return Job(compile_graph(g, model.arch).bind(batch), inputs, reduce)


def _lengths(model, data) -> torch.Tensor:
    """``[2, B]``: tokens per base and source prompt."""
    tok = model.tokenizer
    return torch.tensor([[len(ids) for ids in tok(prompts)["input_ids"]] for prompts in (data.base, data.source)])


def base_and_source_runs(model, data: Counterfactual, conditions: dict) -> Runs:
    """Run the base (keeping its cache and block inputs) and the source (collecting the
    activations every condition of ``{component: conditions}`` reads), both unpatched."""
    inputs, _ = tokenize(model, {"base": data.base}, "left")
    with torch.no_grad():
        out = model.hf(**{k: v.to(runnable(model)) for k, v in inputs.items()}, use_cache=True,
                       output_hidden_states=True)
    g = Graph()
    for component, conds in conditions.items():
        for layer, pos in dict.fromkeys((c[0], c[1]) for c in conds):
            g.add(Site(component, layer, positions=pos if pos == "all" else (pos,)), Collect(),
                  name=f"{component}/{layer}/{pos}")
    src_inputs, batch = tokenize(model, {"base": data.source}, "left")
    with torch.no_grad():
        src_logits, collected = executor(model).forward(compile_graph(g, model.arch).bind(batch), src_inputs)
    correct, wrong = data.answer_ids(model, required=False)
    ref = Reference(correct, wrong, src_logits[:, -1])
    values = {tuple(k.split("/")): v for k, v in collected.items()}
    cache = getattr(out, "cache", None) or out.past_key_values
    return Runs(inputs, cache, out.hidden_states, out.logits[:, -1], src_logits[:, -1], ref, values)


def patched_values(model, runs: Runs, component: str, conditions: list, metric_fn, memory_mb: float,
                   bar=None) -> list:
    """The metric's mean over rows for each condition, in order (see :func:`sweep`); ``bar``
    (a progress bar) advances by the conditions of each forward."""
    positions = list(dict.fromkeys(c[1] for c in conditions))
    mask = runs.inputs["attention_mask"]
    n_rows, seq = mask.shape
    start = mask.argmax(1)
    length = mask.sum(1)
    index = {p: (torch.arange(seq).expand(n_rows, -1) if p == "all"
                 else resolve_positions((p,), start, length).index[:, 0]) for p in positions}
    first = {p: 0 if p == "all" else int(index[p].min()) for p in positions}  # earliest padded index
    per_row = row_bytes(model, seq)
    max_rows = max(1, int(memory_mb * 2**20 // per_row))
    values = [None] * len(conditions)
    for layer in sorted({c[0] for c in conditions}):
        todo = sorted((i for i, c in enumerate(conditions) if c[0] == layer), key=lambda i: -first[conditions[i][1]])
        tokens = [seq - first[conditions[i][1]] for i in todo]  # tokens each condition recomputes
        fixed = FORWARD_COST / (model.arch.n_layers - layer)  # in row-tokens of this layer's forwards
        for lo, hi in _groups(tokens, n_rows, max_rows, fixed):
            chunk = todo[lo:hi]
            conds = [conditions[j] for j in chunk]
            logits = _run_chunk(model, runs, component, conds, index, seq - tokens[hi - 1])
            scores = metric_fn(logits, runs.ref.repeat(len(conds))).view(n_rows, len(conds)).mean(0)
            for j, v in zip(chunk, scores.tolist()):
                values[j] = v
            if bar is not None:
                bar.update(len(chunk))
    return values


# A forward's fixed cost (trace set-up, small-batch inefficiency), in token-layers: one
# token through one block. Measured on 2 CPU cores with SmolLM2-135M.
FORWARD_COST = 1000


def _groups(tokens: list, n_rows: int, max_rows: int, fixed: float) -> list:
    """Split conditions (sorted by the tokens they recompute, ascending) into forwards that
    minimise ``sum(fixed + rows * longest)``, at most ``max_rows`` rows each.

    >>> _groups([1, 2, 3, 8], n_rows=16, max_rows=1000, fixed=64)
    [(0, 3), (3, 4)]
    """
    n = len(tokens)
    best = [0.0] + [float("inf")] * n   # best[j]: cost of the first j conditions
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            if (j - i) * n_rows > max_rows and j - i > 1:
                break
            cost = best[i] + fixed + (j - i) * n_rows * tokens[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def row_bytes(model, seq: int) -> int:
    """Bytes one row of ``seq`` tokens needs in a forward (cache, activations, logits), roughly."""
    a = model.arch
    size = next(model.hf.parameters()).element_size()
    cache = a.n_layers * 2 * a.n_kv_heads * a.head_dim * seq
    acts = seq * (8 * a.d_model + 3 * a.d_mlp + 2 * a.n_heads * seq)
    return size * (cache + acts + model.hf.config.vocab_size)


def _run_chunk(model, runs: Runs, component: str, conds: list, index: dict, keep: int) -> torch.Tensor:
    """One forward for the conditions of one layer: rows ordered (data row, condition).
    Tokens before ``keep`` come from the base cache; layers below the patched one are skipped."""
    arch, layer = model.arch, conds[0][0]
    n_cond = len(conds)
    ids, mask, pos_ids = (runs.inputs.get(k) for k in ("input_ids", "attention_mask", "position_ids"))
    if pos_ids is None:   # the model numbers positions itself, from the ids it sees: no cached prefix
        keep = 0
    n_rows, seq = ids.shape
    rep = (lambda t: t.repeat_interleave(n_cond, 0).to(model.device))
    inputs = {"input_ids": rep(ids[:, keep:]), "attention_mask": rep(mask), "logits_to_keep": 1}
    if pos_ids is not None:
        inputs["position_ids"] = rep(pos_ids[:, keep:])
    if keep:
        cache = copy.deepcopy(runs.cache)
        cache.crop(keep - seq)
        cache.batch_repeat_interleave(n_cond)
        inputs["cache"] = cache
    src = {k[1:]: v for k, v in runs.source_values.items() if k[0] == component}
    width = src[(str(layer), str(conds[0][1]))][0].shape[2:]
    value = torch.zeros(n_rows, n_cond, seq - keep, *width)
    where = torch.zeros(n_rows, n_cond, seq - keep, *width[:-1], 1, dtype=torch.bool)
    rows = torch.arange(n_rows)
    for c, (_, pos, _, head) in enumerate(conds):
        act, valid = src[(str(layer), str(pos))]
        if pos == "all":
            cols = mask.argmax(1)[:, None] + torch.arange(act.shape[1]) - keep
            r = rows[:, None].expand_as(cols)[valid]
            tgt, act = cols[valid], act[valid]
        else:
            r, tgt, act = rows, index[pos] - keep, act[:, 0]
        if head is None:
            value[r, c, tgt] = act
            where[r, c, tgt] = True
        else:
            value[r, c, tgt, head] = act[:, head]
            where[r, c, tgt, head] = True
    # the chunk as a plan: one Set node writes the source values where ``where`` holds
    g = Graph()
    g.add(Site(component, layer), Set(value.flatten(0, 1), mask=where.flatten(0, 1)), name="patch")
    n, width = n_rows * n_cond, seq - keep
    skip = Skip(layer, rep(runs.hidden[layer][:, keep:])) if layer else None
    with torch.no_grad():
        logits, _ = executor(model).forward(compile_graph(g, arch).bind(Batch.full(n, width)), inputs, skip=skip)
    return logits[:, -1]
