"""Edges: which sender -> receiver connections of the residual stream matter.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")        # 2 layers, 4 query heads, 2 key-value heads
>>> table = edges(lm)
>>> len(table), table.iloc[0][["sender", "receiver"]].tolist()
(82, ['input', 'a0.h0<q>'])

The stream is a sum of what the senders wrote: the embeddings (``input``), each head's
output through its slice of the output projection (``a{L}.h{h}``) and each MLP's output
(``m{L}``). Each receiver reads it through its own copy: each head's query, key and value
input (``a{L}.h{h}<q>``, ``<k>``, ``<v>``; key-value heads for ``k``/``v``), each MLP's input
(``m{L}``) and the logits (``logits``): the receiver-input components ``q_in``, ``k_in``,
``v_in``, ``mlp_in`` and ``logits_in``. An edge is a sender an earlier part of the forward
wrote and a receiver reads: sender layer < receiver layer, or attention -> MLP of one
layer where the block is sequential (parallel blocks have none).

:func:`edge_scores` scores every edge by the effect of giving its receiver the sender's
value from the corrupted run, on the clean run (the convention of
:mod:`reftgraph.circuits`: ``data.source`` holds the clean prompts, ``data.base`` the
corrupted ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from ..arch.components.heads import qkv_slicer
from ..arch.components.inputs import head_input_grads
from ..arch.structure import Hook
from ..core.graph import Graph
from ..core.ops import Collect, Set
from ..core.ops.base import Op
from ..core.sites import Site
from ..engine import as_model, run
from ..errors import DataError, SiteError
from ..training.counterfactual import Counterfactual
from ..viz.progress import progress_bar
from .patching.attribution import check_metric, equal_lengths, one_length, probe
from .patching.metrics import Reference, get_metric

__all__ = ["edges", "edge_scores", "METHODS", "WriteMap", "out_maps", "rms_scale", "sender_graph"]

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "exact")
NEEDS = ("embed", "head_out", "mlp_out", "q_in", "k_in", "v_in", "mlp_in", "logits_in")
HEAD_INPUTS = ("q_in", "k_in", "v_in")


@dataclass(frozen=True)
class _Unit:
    """A sender or receiver: its name, kind, layer (-1: before the blocks; n: after) and head."""

    name: str
    kind: str
    layer: int
    head: Optional[int] = None


def _check_arch(arch) -> None:
    """Refuse, naming the component and the reason, a model whose senders or receivers are not proven."""
    for style, how in (("post_ln", "normalise the stream after each addition"),
                       ("scaled", "scale each addition (edges read heads' writes unscaled)"),
                       ("weighted", "weigh the stream itself against each addition")):
        post = [i for i, b in enumerate(arch.blocks) if b.style == style]
        if post:
            raise SiteError(f"edges need each head's output to be a term of the stream, but layers {post} {how} "
                            f"({style} blocks): no head writes a term")
    for c in NEEDS:
        for layer in ([0] if c == "embed" else [arch.n_layers - 1] if c == "logits_in" else range(arch.n_layers)):
            why = arch.refusal(c, layer)
            if why:
                raise SiteError(f"edges need {c} on every layer, and {why}")


def units(arch) -> tuple[list, list]:
    """``(senders, receivers)`` of an architecture, in forward order.

    >>> import reftgraph as rg
    >>> senders, receivers = units(rg.models.tiny("llama").arch)
    >>> [s.name for s in senders[:3]], receivers[-1].name
    (['input', 'a0.h0', 'a0.h1'], 'logits')
    """
    senders, receivers = [_Unit("input", "input", -1)], []
    for layer in range(arch.n_layers):
        senders += [_Unit(f"a{layer}.h{h}", "head", layer, h) for h in range(arch.heads("head_out", layer))]
        for c in "qkv":
            receivers += [_Unit(f"a{layer}.h{h}<{c}>", c, layer, h) for h in range(arch.heads(f"{c}_in", layer))]
        receivers.append(_Unit(f"m{layer}", "mlp", layer))
        senders.append(_Unit(f"m{layer}", "mlp", layer))
    receivers.append(_Unit("logits", "logits", arch.n_layers))
    return senders, receivers


def edges(model) -> pd.DataFrame:
    """Every edge of ``model``: one row per (sender, receiver), in forward order.

    >>> import reftgraph as rg
    >>> table = edges(rg.models.tiny("gpt_neox"))     # parallel blocks: no attention -> MLP edge in a layer
    >>> table.columns.tolist()[:4], bool(((table.sender == "a0.h0") & (table.receiver == "m0")).any())
    (['sender', 'receiver', 'sender_kind', 'sender_layer'], False)
    """
    model = as_model(model)
    arch = model.arch
    _check_arch(arch)
    if any(b.style == "post_norm" for b in arch.blocks):
        out_maps(model)             # (a post-norm that is no RMS norm, or an output bias: refused)
    senders, receivers = units(arch)
    mid = np.array(["resid_mid" not in b.refused for b in arch.blocks] + [False])   # sequential layers
    s_layer = np.array([s.layer for s in senders])[:, None]
    r_layer = np.array([r.layer for r in receivers])[None, :]
    s_head = np.array([s.kind == "head" for s in senders])[:, None]
    r_mlp = np.array([r.kind == "mlp" for r in receivers])[None, :]
    # sender layer < receiver layer, or attention -> MLP of one sequential layer
    keep = (s_layer < r_layer) | ((s_layer == r_layer) & s_head & r_mlp & mid[np.maximum(s_layer, 0)])
    r_index, s_index = np.nonzero(keep.T)                                 # receiver by receiver, in order
    columns = {"sender": [s.name for s in senders], "receiver": [r.name for r in receivers],
               "sender_kind": [s.kind for s in senders], "sender_layer": [s.layer for s in senders],
               "sender_head": [s.head for s in senders], "receiver_kind": [r.kind for r in receivers],
               "receiver_layer": [r.layer for r in receivers], "receiver_head": [r.head for r in receivers]}
    return pd.DataFrame({name: np.array(values, dtype=object)[s_index if name.startswith("sender") else r_index]
                         for name, values in columns.items()}).infer_objects()


# -- the values senders write and receivers read --------------------------------------------

def sender_sites(arch) -> list:
    """``[(name, site)]``: where the senders write, one site per layer for all heads.

    >>> import reftgraph as rg
    >>> [(name, str(site)) for name, site in sender_sites(rg.models.tiny("llama").arch)][:2]
    [('input', 'embed[0] pos=all'), ('a0', 'head_out[0] pos=all')]
    """
    sites = [("input", Site("embed"))]
    for layer in range(arch.n_layers):
        sites += [(f"a{layer}", Site("head_out", layer)), (f"m{layer}", Site("mlp_out", layer))]
    return sites


def receiver_site(r) -> Site:
    """The site whose copy of the stream receiver ``r`` (a unit of :func:`units`) reads.

    >>> import reftgraph as rg
    >>> str(receiver_site(units(rg.models.tiny("llama").arch)[1][0]))
    'q_in[0].h0 pos=all'
    """
    if r.kind == "logits":
        return Site("logits_in")
    if r.kind == "mlp":
        return Site("mlp_in", r.layer)
    return Site(f"{r.kind}_in", r.layer, head=r.head)


def sender_graph(arch, groups: bool = False) -> Graph:
    """A graph that collects what the senders write (node names as :func:`sender_sites`); with
    ``groups``, each layer's attention output too (``attn{L}``).

    >>> import reftgraph as rg
    >>> [n.name for n in sender_graph(rg.models.tiny("llama").arch).nodes]
    ['input', 'a0', 'm0', 'a1', 'm1']
    """
    g = Graph()
    for name, site in sender_sites(arch):
        g.add(site, Collect(), name=name)
    for name, site in _groups(arch, "eap-ig-activations") if groups else ():
        if site.component == "attn_out":   # (the embeddings and MLP outputs are senders already)
            g.add(site, Collect(), name=name)
    return g


def _groups(arch, method: str) -> list:
    """``[(name, site)]``: the outputs EAP-IG moves, in forward order: the embeddings (on
    inputs), or the embeddings, each attention output and each MLP output (on activations)."""
    if method == "eap-ig-inputs":
        return [("input", Site("embed"))]
    out = [("input", Site("embed"))]
    for layer in range(arch.n_layers):
        out += [(f"attn{layer}", Site("attn_out", layer)), (f"m{layer}", Site("mlp_out", layer))]
    return out


@dataclass(frozen=True)
class WriteMap:
    """What the heads of one layer write to the stream, from their outputs ``z`` ``[B, k, H, dh]``:
    ``scaled(z)`` then each head's map ``maps`` ``[H, dh, d]`` (the output projection applied to
    unit vectors, less its bias).

    >>> import torch, reftgraph as rg
    >>> write = out_maps(rg.models.tiny("llama"))[0]
    >>> write.maps.shape, write(torch.zeros(1, 3, 4, 8)).shape
    (torch.Size([4, 8, 32]), torch.Size([1, 3, 4, 32]))

    Where a norm follows the attention before its addition (post-norm blocks: Gemma 2/3,
    OLMo2), the block adds ``c * o / rms(o)`` with ``o`` the projection's output: a sum over
    the heads at the scale of the whole output, so head h writes ``c * o_h / rms(o)``, its own
    term of what the block adds. ``norm = (projection [H dh, d], c [d], eps)``: ``maps`` carry
    ``c``, and ``scaled(z)`` divides each token's outputs by ``rms(o)`` of that token.
    """

    maps: torch.Tensor
    norm: Optional[tuple] = None

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """The heads' outputs ``z`` as the maps take them: divided by ``rms(o)`` per token after a
        post-norm, else as they are.

        >>> import torch, reftgraph as rg
        >>> z = torch.ones(1, 2, 4, 8)
        >>> torch.equal(out_maps(rg.models.tiny("llama"))[0].scaled(z), z)
        True
        """
        if self.norm is None:
            return z
        proj, _, eps = self.norm
        o = z.reshape(*z.shape[:-2], -1).float() @ proj
        return z / torch.sqrt(o.pow(2).mean(-1) + eps)[..., None, None].to(z.dtype)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkhe,hed->bkhd", self.scaled(z), self.maps.to(z.dtype))


def rms_scale(norm, width: int, where: str) -> tuple:
    """``(c, eps)`` of a norm that computes ``c * x / sqrt(mean(x^2) + eps)`` (an RMS norm with
    a gain, as Gemma's ``1 + weight`` or Llama's ``weight``), measured on random inputs and
    checked; any other norm is refused (a :class:`~reftgraph.SiteError` naming ``where``).

    >>> import torch
    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> c, eps = rms_scale(LlamaRMSNorm(4, eps=1e-6), 4, "layer 0")
    >>> [round(v, 4) for v in c.tolist()], eps
    ([1.0, 1.0, 1.0, 1.0], 1e-06)
    """
    eps = next((float(getattr(norm, k)) for k in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(norm, k, None), (int, float))), None)
    param = next(norm.parameters(), None)
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(0)).to(
        param.dtype if param is not None else torch.float32)
    if eps is not None:
        with torch.no_grad():
            y = norm(x.to(param.device if param is not None else "cpu")).float().cpu()
        x = x.float()
        r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        c = (y * r * x).sum(0) / x.pow(2).sum(0)
        if torch.allclose(y, c * x / r, rtol=1e-3, atol=1e-5 * float(y.abs().max())):
            return c, eps
    raise SiteError(f"edges read each head's term of what the block adds; at {where} the norm after attention "
                    f"({type(norm).__name__}) is not an RMS norm with a gain (c * x / sqrt(mean(x^2) + eps)), so "
                    f"its output is no sum of the heads' terms")


def _rms_or_none(norm, width: int):
    """``(c, eps)`` when ``norm`` is an RMS norm with a gain (see :func:`rms_scale`), else None.
    Measured at each call (a fraction of a millisecond): the norm's weights may have changed."""
    try:
        return rms_scale(norm, width, "")
    except SiteError:
        return None


def out_maps(model) -> list:
    """Per layer, what each head writes to the stream (a :class:`WriteMap`).

    >>> import reftgraph as rg
    >>> out_maps(rg.models.tiny("llama"))[0].maps.shape
    torch.Size([4, 8, 32])
    """
    arch, maps = model.arch, []
    for layer in range(arch.n_layers):
        block = arch.blocks[layer]
        proj = arch.envoy(model.hf, Hook(layer, 0, block.paths.attn_proj, "output"))
        n, dh = arch.heads("head_out", layer), arch.width("head_out", layer)
        dtype = next(proj.parameters()).dtype
        with torch.no_grad():
            eye = torch.eye(n * dh, dtype=dtype, device=next(proj.parameters()).device)
            bias = proj(torch.zeros_like(eye[:1]))
            full = (proj(eye) - bias).float()
        if block.style != "post_norm":
            maps.append(WriteMap(full.view(n, dh, -1)))
            continue
        where = f"layer {layer} ({block.attn_out})"
        if bias.abs().max() > 0:
            raise SiteError(f"edges read each head's term of what the block adds; at {where} the attention's output "
                            f"projection has a bias, whose share of the norm after it belongs to no head")
        norm = arch.envoy(model.hf, Hook(layer, 0, block.attn_out, "output"))
        c, eps = rms_scale(norm, full.shape[-1], where)
        maps.append(WriteMap((full * c.to(full.device)).view(n, dh, -1), (full, c, eps)))
    return maps


def _delta_writes(model, corrupt, clean, maps, valid) -> torch.Tensor:
    """What every sender wrote in the corrupted run less what it wrote in the clean one,
    ``[senders, B, k, d]`` (slots in prompt order, zero where not valid), from two collect runs:
    the differences are taken before the heads' maps (one map per layer)."""
    keep = valid.float()
    parts = [((corrupt["input"].detach().float() - clean["input"].detach().float()) * keep[..., None])[None]]
    for layer in range(model.arch.n_layers):
        write = maps[layer]
        a = f"a{layer}"
        diff = write.scaled(corrupt[a].detach().float()) - write.scaled(clean[a].detach().float())
        heads = torch.einsum("bkhe,hed->hbkd", diff * keep[..., None, None], write.maps)
        m = f"m{layer}"
        parts += [heads, ((corrupt[m].detach().float() - clean[m].detach().float()) * keep[..., None])[None]]
    return torch.cat(parts, 0)


def edge_scores(model, data: Counterfactual, method: str = "eap", metric="logit_diff", steps: int = 5,
                progress: bool = True, per_position: bool = False) -> pd.DataFrame:
    """Score every edge of ``model`` on ``data``: :func:`edges` with a ``score`` column.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> table = edge_scores(lm, data, progress=False)
    >>> len(table), table.attrs["method"], table.columns[-1]
    (82, 'eap', 'score')

    ``method="eap"`` (edge attribution patching, Syed et al. 2023): ``(a_corrupt - a_clean)
    . dM/d(receiver input)``, summed over positions and averaged over rows, from one clean
    forward and backward (every receiver's gradient at once, through its own copy of the
    stream) and one corrupted forward. ``method="eap-ig-inputs"`` (EAP-IG, Hanna et al. 2024):
    the gradient averaged over ``steps`` forwards whose embeddings run from the corrupted ones
    towards the clean ones (``corrupt + (k / steps) (clean - corrupt)``, k = 0 .. steps - 1, as
    ``get_scores_eap_ig`` in hannamw/EAP-IG). ``method="eap-ig-activations"`` (EAP-IG on
    activations): the gradient averaged over ``steps`` forwards per sender group (the
    embeddings, each layer's attention output, each MLP's output), each moving that group's
    output from the corrupted run's towards the clean run's (``corrupt + (k / steps) (clean -
    corrupt)``, k = 1 .. steps, as ``get_scores_ig_activations`` in hannamw/EAP-IG): ``(2
    layers + 1) x steps`` forwards and backwards. ``method="exact"``: one forward per edge, the
    receiver's copy of the stream moved by the sender's ``a_corrupt - a_clean``; the change of
    the metric (small models and tests). Clean (``data.source``) and corrupted
    (``data.base``) prompts must have equal lengths, row by row. ``metric`` as in
    :func:`~reftgraph.patching.sweep`.

    ``per_position=True`` scores every edge at every token position (a ``position`` column: a
    sender's write at token p into a receiver's input at token p; the rows sum to the edge's
    score): prompts of one length, gradient methods only (``"exact"`` would take one forward
    per edge and position).
    """
    model = as_model(model, one_stack="rg.circuits.edge_scores")
    if method not in METHODS:
        raise DataError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise DataError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(data, Counterfactual):
        raise DataError(f"edge_scores takes a rg.patching.Counterfactual, got {type(data).__name__}")
    table = edges(model)
    equal_lengths(model, data, "edge scores give a receiver the corrupted sender's value token for token: the "
                  "corrupted (base) and clean (source) prompts must have equal lengths")
    if per_position:
        if method == "exact":
            raise DataError("per_position=True needs a gradient method (eap, eap-ig-inputs, eap-ig-activations); "
                            "got method 'exact'")
        one_length(model, data)
    metric_name, metric_fn = get_metric(metric)
    correct, wrong = data.answer_ids(model, required=False)
    check_metric(metric_fn, Reference(correct, wrong), model)
    arch = model.arch
    senders, receivers = units(arch)
    maps = out_maps(model)
    collect = sender_graph(arch, groups=method == "eap-ig-activations")
    grad = None
    if method == "eap":     # the clean writes come from the gradient's own (clean) forward
        grad, clean = _gradients(model, data.source, receivers, metric_fn, Reference(correct, wrong), senders=arch)
    else:
        clean = run(collect, model, data.source, grad=False, logits="last")
    ref = Reference(correct, wrong, clean.next_token_logits.detach())
    runs = []                # EAP-IG: the gradient averaged over outputs from the corrupted to the clean
    if method == "eap-ig-inputs":
        # its first run (k = 0) is the corrupted run itself, which also gives the corrupted writes
        first, corrupt = _gradients(model, data.base, receivers, metric_fn, ref, senders=arch)
        grad = {key: value / steps for key, value in first.items()}
        runs = [("input", Site("embed"), k / steps) for k in range(1, steps)]
    else:
        corrupt = run(collect, model, data.base, grad=False, logits="last")
        if method == "eap-ig-activations":
            grad = {}
            runs = [(name, site, k / steps) for name, site in _groups(arch, method) for k in range(1, steps + 1)]
    valid = clean.valid["input"]
    delta = _delta_writes(model, corrupt, clean, maps, valid)          # [senders, B, k, d]
    index = {s.name: i for i, s in enumerate(senders)}
    if method != "exact":
        share = steps if method == "eap-ig-inputs" else len(runs)      # (on activations: every group's runs)
        for name, site, alpha in progress_bar(runs, desc=method, progress=progress and len(runs) > 1, unit="run"):
            moved = corrupt[name] + alpha * (clean[name] - corrupt[name])
            step = _gradients(model, data.source, receivers, metric_fn, ref, (site, moved), valid)[0]
            for key, value in step.items():
                grad[key] = grad[key] + value / share if key in grad else value / share
        scores = _products(delta, grad, senders, receivers, per_position)
        column = {r.name: i for i, r in enumerate(receivers)}
        rows, cols = table.sender.map(index).to_numpy(copy=True), table.receiver.map(column).to_numpy(copy=True)
        picked = scores[torch.from_numpy(rows), torch.from_numpy(cols)]          # [edges] or [edges, positions]
        if per_position:
            table = table.loc[table.index.repeat(picked.shape[1])].reset_index(drop=True)
            table["position"] = list(range(picked.shape[1])) * len(rows)
        table["score"] = picked.flatten().tolist()
    else:
        base = metric_fn(clean.next_token_logits, ref).mean()
        pairs = zip(table.sender, table.receiver)
        by_name = {r.name: r for r in receivers}
        table["score"] = [_exact(model, data, by_name[r], delta[index[s]], metric_fn, ref) - float(base)
                          for s, r in progress_bar(pairs, total=len(table), desc="edges", progress=progress, unit="run")]
    # the metric of both runs: which way corrupting moves it (rg.circuits.carrying)
    clean_metric, corrupted_metric = (float(metric_fn(logits, ref).mean())
                                      for logits in (ref.source_logits, corrupt.next_token_logits.detach()))
    table.attrs.update(method=method, metric=metric_name, clean=clean_metric, corrupted=corrupted_metric)
    return table


def _products(delta, grads: dict, senders, receivers, per_position: bool = False) -> torch.Tensor:
    """``[senders, receivers]`` (``[senders, receivers, slots]`` per position): each sender's
    write change dotted with each receiver's gradient, summed over slots and averaged over rows;
    a receiver of layer l takes only the senders of layers up to l (the others send it
    nothing), one product per layer."""
    rows, slots = delta.shape[1], delta.shape[2]
    flat = delta.reshape(delta.shape[0], -1)
    scores = torch.zeros(len(senders), len(receivers), *((slots,) if per_position else ()))
    s_layer = torch.tensor([s.layer for s in senders])
    for layer in sorted({r.layer for r in receivers}):
        cols = [i for i, r in enumerate(receivers) if r.layer == layer]
        block = torch.stack([_receiver_grad(grads, receivers[i]) for i in cols])          # [cols, B, k, d]
        n = int((s_layer <= layer).sum())      # senders come in layer order
        if per_position:
            scores[:n, cols] = torch.einsum("sbkd,rbkd->srk", delta[:n], block) / rows
        else:
            scores[:n, cols] = flat[:n] @ block.reshape(len(cols), -1).T / rows
    return scores


def _receiver_grad(grads: dict, r) -> torch.Tensor:
    """Receiver ``r``'s gradient ``[B, k, d]`` from the gradients per receiver site (all heads)."""
    gr = grads[receiver_site(r).replace(head=None)]
    return gr if r.head is None else gr[:, :, r.head]


def _gradients(model, prompts, receivers, metric_fn, ref, moved=None, valid=None, senders=None) -> tuple:
    """``({receiver site: gradient [B, k, (H,) d]}, the run)``: the metric's gradient at each
    receiver's copy of the stream (one site per layer and kind, all heads), from one forward
    of ``prompts`` (with ``moved = (site, value)``: that site's output set to ``value``) and one
    backward; with ``senders`` (an Arch) the run also collects what the senders wrote (see
    :func:`_delta_writes`), and a ``ref`` without source logits takes this run's.

    The heads' query, key and value inputs are not run as copies: the backward stops at the
    heads' slices of each projection, and each copy's gradient follows from there and the
    block's input (:func:`~reftgraph.arch.components.inputs.head_input_grads`), one layer at a
    time, what a probe on the copies gives."""
    arch = model.arch
    g, probes = (sender_graph(senders) if senders is not None else Graph()), {}
    if moved is not None:
        g.add(moved[0], Set(moved[1], mask=valid[..., None]), name="moved")
    for r in receivers:
        key = receiver_site(r).replace(head=None)
        if key in probes:
            continue
        probes[key] = probe()
        if key.component in HEAD_INPUTS:        # the gradient at the projection's slices, and the block input
            g.add(Site(key.component[0], key.layer), probes[key], name=f"{key.component[0]}{key.layer}")
            if f"pre{key.layer}" not in g:
                g.add(Site("resid_pre", key.layer), Collect(), name=f"pre{key.layer}")
        else:
            g.add(key, probes[key], name=f"{key.component}{key.layer}")
    out = run(g, model, prompts, grad=True, logits="last")
    if ref.source_logits is None:
        ref = Reference(ref.correct, ref.wrong, out.next_token_logits.detach())
    total = metric_fn(out.next_token_logits, ref).sum()
    ops = list(probes.values())
    found = torch.autograd.grad(total, [op.delta for op in ops], allow_unused=True)
    grads = {key: (torch.zeros_like(op.delta) if gr is None else gr) for key, op, gr in zip(probes, ops, found)}
    shared = {}             # (layer, the norm they read) -> the head inputs reading the block input through it
    for key in grads:
        if key.component in HEAD_INPUTS:
            shared.setdefault((key.layer, arch.blocks[key.layer].reads.get(key.component, "")), []).append(key)
    for (layer, norm), keys in shared.items():
        block = arch.blocks[layer]
        norm = arch.envoy(model.hf, Hook(layer, 0, norm, "output")) if norm else None
        x = out[f"pre{layer}"]
        found = head_input_grads(x, [grads[k] for k in keys], norm,
                                 [arch.envoy(model.hf, arch.hook(k.component, layer)) for k in keys],
                                 [qkv_slicer(k.component[0], arch, block, layer)[0] for k in keys],
                                 rms=None if norm is None else _rms_or_none(norm, x.shape[-1]))
        grads.update(zip(keys, found))
    return {key: gr.detach().float() for key, gr in grads.items()}, out


class _Shift(Op):
    """Adds a fixed ``[B, k, d]`` tensor (slots in prompt order) to the slice (one head)."""

    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, h, source=None, valid=None):
        d = self.delta.to(h.dtype)
        return h + (d[:, :, None] if h.dim() == 4 else d)


def _exact(model, data, receiver, delta, metric_fn, ref) -> float:
    g = Graph()
    g.add(receiver_site(receiver), _Shift(delta), name="edge")
    out = run(g, model, data.source, grad=False, logits="last")
    return float(metric_fn(out.next_token_logits, ref).mean())
