"""Attribution patching: every site's patching effect estimated from two forwards and one backward.

AtP (Nanda 2023) replaces each patched run of a :func:`~reftgraph.patching.sweep` by its
first-order term at the base run, ``(a_source - a_base) . dM/da``, for every site at once.
AtP* (Kramár et al. 2024, arXiv 2403.00745) adds two fixes, both here:

- **QK fix** (``qk_fix=True``, the default): for ``q`` and ``k`` sites the attention softmax
  is recomputed with the patched query (or key), and only the rest of the model is
  linearised: the estimate is ``dM/dz . (z' - z)`` with ``z`` the heads' outputs (``head_out``)
  of that layer. A query moves its own position's output alone, so one run per layer gives
  every query's ``z'``; a key moves every later query of its group, so each key position is
  one row of a batched run. These runs stop after the patched layer.
- **GradDrop** (``grad_drop=True``): the backward pass is repeated once per layer with the
  gradient through that layer's ``attn_out`` and ``mlp_out`` dropped, and the magnitudes
  are summed, ``sum_l |estimate_l| / (L - 1)``: a site whose direct and indirect effects
  cancel in the plain gradient still scores. Returned as the ``grad_drop`` column.

``ig_steps=m`` averages the gradient over ``m`` points between the base and the source
run (the block-0 input interpolated at every position, as EAP-IG does), which helps where
the metric is far from linear between the two runs.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
>>> df = rg.patching.attribute(lm, data, "head_out")
>>> df.columns.tolist()
['component', 'layer', 'position', 'token', 'head', 'metric', 'value', 'restoration', 'estimate', 'mean_abs']
>>> len(df)                          # 2 layers x 4 heads, all positions
8
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pandas as pd
import torch

from ...core.graph import Graph
from ...core.ops import Collect, Set
from ...core.ops.base import Op
from ...core.sites import HEAD_COMPONENTS, Site, resolve_positions
from ...engine import Skip, as_model, compile_graph, executor, run, tokenize
from ...errors import DataError, SiteError
from ...viz.progress import progress_bar
from ...training.counterfactual import Counterfactual
from .metrics import Reference, get_metric, restoration
from .sweeps import row_bytes, sweep_conditions

__all__ = ["attribute", "probe", "check_metric", "equal_lengths"]


class _Probe(Op):
    """Adds a zero that requires grad, so that a backward pass leaves ``dM/d(slice)`` in
    ``probe.delta.grad``; records the slice it saw in ``probe.value``.

    >>> import torch
    >>> p = _Probe()
    >>> out = p(torch.ones(1, 2, 3))
    >>> out.sum().backward()
    >>> p.delta.grad.tolist(), p.value.shape
    ([[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]], torch.Size([1, 2, 3]))
    """

    def forward(self, h, source=None, valid=None):
        self.value = h.detach()
        self.delta = torch.zeros_like(h, requires_grad=True)
        return h + self.delta


def probe() -> "_Probe":
    """An op that leaves ``dM/d(slice)`` in ``op.delta.grad`` after a backward (see :class:`_Probe`).

    >>> type(probe()).__name__
    '_Probe'
    """
    return _Probe()


class _StopGrad(Op):
    """The slice unchanged going forward, with no gradient flowing back through it.

    >>> import torch
    >>> x = torch.ones(1, 1, 2, requires_grad=True)
    >>> _StopGrad()(x).requires_grad
    False
    """

    def forward(self, h, source=None, valid=None):
        return h.detach()


def attribute(model, data: Counterfactual, component: Union[str, Sequence[str]] = "resid_pre",
              layers: Optional[Sequence[int]] = None, positions=None, heads=None, metric="logit_diff",
              qk_fix: bool = True, grad_drop: bool = False, ig_steps: int = 0,
              memory_mb: float = 1024, progress: bool = True) -> pd.DataFrame:
    """Estimate :func:`~reftgraph.patching.sweep` for every site from gradients (AtP / AtP*).

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> est = attribute(lm, data, ["mlp_out", "q"], positions="all", grad_drop=True)
    >>> est.groupby("component").size().to_dict(), "grad_drop" in est     # 2 MLPs, 2 x 4 query heads
    ({'mlp_out': 2, 'q': 8}, True)

    Takes the same arguments as :func:`~reftgraph.patching.sweep` and returns its columns
    (``value`` is the estimated patched metric ``base + estimate``, ``restoration`` from it)
    plus ``estimate``: the estimated change of the metric's mean over the data, and
    ``mean_abs``: the mean over rows of each row's ``|estimate|`` (large for a site that
    matters in every row, whichever way it moves the metric in each). Every
    component works (``resid_*``, ``attn_out``, ``mlp_out``, ``mlp_act``, ``head_out``,
    ``q``/``k``/``v`` per head), at chosen positions or at all positions summed.
    ``qk_fix``, ``grad_drop`` and ``ig_steps`` are described in the module docstring.
    Rows run in chunks sized to ``memory_mb``; a progress bar counts the passes
    (``progress=False`` hides it). Plain AtP is known to miss sites in two
    ways: saturated attention (a near-zero softmax gradient; the QK fix handles q/k) and
    cancelling paths (GradDrop); the residual stream at early layers, where the patched
    run differs most from the base run, is where the linear estimate is least accurate.
    """
    model = as_model(model, one_stack="rg.patching.attribute")
    if not isinstance(data, Counterfactual):
        raise DataError(f"attribute takes a rg.patching.Counterfactual, got {type(data).__name__}")
    if grad_drop and ig_steps:
        raise DataError("choose grad_drop=True or ig_steps=m, not both")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 0:
        raise DataError(f"ig_steps must be an int >= 0 (0: plain gradients), got {ig_steps!r}")
    components = [component] if isinstance(component, str) else list(component)
    metric_name, metric_fn = get_metric(metric)
    conditions = {c: sweep_conditions(model, data, c, layers, positions, heads) for c in components}
    sites = {(c, layer): _selector(conds) for c, conds in conditions.items() for layer in {x[0] for x in conds}}
    fixed = {key: sel for key, sel in sites.items() if qk_fix and key[0] in ("q", "k")}
    if ig_steps:
        equal_lengths(model, data)
    if grad_drop:
        for layer in range(model.arch.n_layers):
            for c in ("attn_out", "mlp_out"):
                if model.arch.refusal(c, layer):
                    raise SiteError(f"grad_drop drops the gradient through attn_out and mlp_out, but {c} "
                                    f"[{layer}] is refused for this model: {model.arch.refusal(c, layer)}")
    correct, wrong = data.answer_ids(model, required=False)
    check_metric(metric_fn, Reference(correct, wrong), model)

    rows = _chunk_rows(model, data, sites, memory_mb)
    totals: dict = {}
    sizes: dict = {}
    drops: dict = {}
    base_sum = source_sum = 0.0
    passes = 2 + len(fixed) + ig_steps + (model.arch.n_layers if grad_drop else 0)   # per chunk of rows
    with progress_bar(total=passes * -(-len(data) // rows), desc="attribute", progress=progress,
                      unit="pass") as bar:
        for lo in range(0, len(data), rows):
            part = data.rows(slice(lo, lo + rows))
            ref = Reference(*(None if t is None else t[lo:lo + rows] for t in (correct, wrong)))
            est, drop, base_m, source_m = _chunk(model, part, ref, sites, fixed, metric_fn, grad_drop, ig_steps,
                                                 memory_mb, bar)
            base_sum += float(base_m.sum())
            source_sum += float(source_m.sum())
            for key, value in est.items():
                totals[key] = totals.get(key, 0) + value.sum(0)
                sizes[key] = sizes.get(key, 0) + value.abs().sum(0)
            for key, value in drop.items():
                drops[key] = drops.get(key, 0) + value.sum(0)
    n = len(data)
    base, source = base_sum / n, source_sum / n
    frames = []
    for c in components:
        df = pd.DataFrame([{"component": c, "layer": layer, "position": pos, "token": tok, "head": head}
                           for layer, pos, tok, head in conditions[c]])
        pick = [_cell(totals[(c, layer)], sites[(c, layer)], pos, head) / n for layer, pos, _, head in conditions[c]]
        df["metric"], df["value"] = metric_name, [base + e for e in pick]
        df["restoration"] = restoration(df["value"], base, source)
        df["estimate"] = pick
        df["mean_abs"] = [_cell(sizes[(c, layer)], sites[(c, layer)], pos, head) / n
                          for layer, pos, _, head in conditions[c]]
        if grad_drop:
            df["grad_drop"] = [_cell(drops[(c, layer)], sites[(c, layer)], pos, head) / n
                               for layer, pos, _, head in conditions[c]]
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(metric=metric_name, base=base, source=source, method=_method(qk_fix, grad_drop, ig_steps))
    return out


def _method(qk_fix, grad_drop, ig_steps) -> str:
    name = "AtP*" if qk_fix and grad_drop else "AtP+QK" if qk_fix else "AtP+GradDrop" if grad_drop else "AtP"
    return name + (f"+IG{ig_steps}" if ig_steps else "")


def _selector(conds: list):
    """A component's positions as one site selector: ``"all"`` or a tuple of ints."""
    positions = list(dict.fromkeys(c[1] for c in conds))
    return "all" if positions == ["all"] else tuple(positions)


def _cell(total: torch.Tensor, selector, pos, head) -> float:
    """One condition's summed estimate from a site's ``[(k,) (heads)]`` totals."""
    value = total if selector == "all" else total[selector.index(pos)]
    return float(value if head is None else value[head])


def equal_lengths(model, data, why: str = "ig_steps interpolates between the runs token for token: it needs base "
                  "and source prompts of equal length") -> None:
    """Refuse, saying ``why``, data whose base and source prompts differ in length in some row.

    >>> import reftgraph as rg
    >>> equal_lengths(rg.models.tiny("llama"), rg.patching.Counterfactual(["ab"], ["abc"], ["c"], ["d"]), "why")
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: why, but row 0 has 2 and 3 tokens
    """
    tok = model.tokenizer
    for i, (a, b) in enumerate(zip(tok(data.base)["input_ids"], tok(data.source)["input_ids"])):
        if len(a) != len(b):
            raise DataError(f"{why}, but row {i} has {len(a)} and {len(b)} tokens")


def one_length(model, data, what: str = "per_position=True") -> int:
    """The token count every prompt of ``data`` has, else a DataError: scores per position
    need a position to be the same token in every row.

    >>> import reftgraph as rg
    >>> one_length(rg.models.tiny("llama"), rg.patching.Counterfactual(["ab", "cd"], ["ba", "dc"], ["c"] * 2, ["d"] * 2))
    2
    """
    lengths = {len(ids) for ids in model.tokenizer(list(data.base) + list(data.source))["input_ids"]}
    if len(lengths) > 1:
        raise DataError(f"{what} needs prompts of one length (a position is the same token in every row); got "
                        f"prompts of {sorted(lengths)} tokens")
    return lengths.pop()


def positions_in(table) -> Optional[int]:
    """The token count of per-position scores (a table with a ``position`` column), else None.

    >>> import pandas as pd
    >>> positions_in(pd.DataFrame({"position": [0, 1, 2]})), positions_in(pd.DataFrame({"score": [1.0]}))
    (3, None)
    """
    return int(table["position"].max()) + 1 if "position" in table else None


def check_metric(metric_fn, ref: Reference, model) -> None:
    """Refuse, before any forward, a metric whose value does not depend on the logits.

    >>> import torch, reftgraph as rg
    >>> check_metric(lambda logits, ref: torch.zeros(len(logits)), Reference(), rg.models.tiny("llama"))
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: attribution differentiates the metric with respect to the logits, but this metric does not depend on them: it must compute its value from the logits it is given
    """
    n = 1 if ref.correct is None else len(ref.correct)
    vocab = model.hf.config.get_text_config().vocab_size
    logits = torch.randn(n, vocab, requires_grad=True)
    probe = Reference(ref.correct, ref.wrong, torch.randn(n, vocab))
    try:
        value = metric_fn(logits, probe)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - a user metric that cannot run: say which
        raise DataError(f"the metric failed on logits of shape [{n}, {vocab}]: {error}") from error
    if not torch.is_tensor(value) or not value.requires_grad:
        raise DataError("attribution differentiates the metric with respect to the logits, but this metric "
                        "does not depend on them: it must compute its value from the logits it is given")
    if value.shape != (n,):
        raise DataError(f"the metric must return one value per row (shape [{n}]), got {list(value.shape)}")


def _chunk_rows(model, data, sites, memory_mb) -> int:
    seq = max(len(ids) for ids in model.tokenizer(data.base + data.source)["input_ids"])
    arch = model.arch
    heads = (lambda c, layer: arch.heads(c, layer) if c in HEAD_COMPONENTS else 1)
    site_bytes = sum(4 * 4 * seq * arch.width(c, layer) * heads(c, layer) for c, layer in sites)  # 4 tensors
    per_row = 3 * row_bytes(model, seq) + site_bytes
    return max(1, int(memory_mb * 2**20 // per_row))


def _chunk(model, data, ref, sites, fixed, metric_fn, grad_drop, ig_steps, memory_mb, bar):
    """Per-row estimates ``{(component, layer): [B, (k,) (heads)]}`` for one chunk of rows;
    ``bar`` advances by one for each pass."""
    n_layers = model.arch.n_layers
    probes = dict(sites)
    for c, layer in fixed:
        probes[("head_out", layer, "qk")] = "all"
    if ig_steps:
        probes[("resid_pre", 0, "ig")] = "all"
    collect = Graph()
    for key, sel in probes.items():
        collect.add(Site(key[0], key[1], positions=sel), Collect(), name=_name(key))
    src = run(collect, model, data.source, grad=False, logits="last")
    ref.source_logits = src.next_token_logits
    bar.update(1)
    grads, values, logits = _gradients(model, data.base, probes, metric_fn, ref)
    bar.update(1)
    base_m, source_m = metric_fn(logits, ref), metric_fn(src.next_token_logits, ref)
    deltas = {key: src[_name(key)] - values[key][0] for key in sites if key not in fixed}
    hidden = _block_inputs(model, data.base) if fixed else None
    for c, layer in fixed:
        z, valid = values[("head_out", layer, "qk")]
        deltas[(c, layer)] = _qk_delta(model, data.base, c, layer, sites[(c, layer)], src[_name((c, layer))],
                                       hidden, z, valid, memory_mb)
        bar.update(1)
    if ig_steps:
        x0, valid = values[("resid_pre", 0, "ig")]
        x1 = src[_name(("resid_pre", 0, "ig"))]
        mean = {key: 0 for key in probes}
        for step in range(ig_steps):
            alpha = (step + 0.5) / ig_steps
            at = Set(x0 + alpha * (x1 - x0), mask=valid[..., None])
            g, _, _ = _gradients(model, data.base, probes, metric_fn, ref, [(Site("resid_pre", 0), at)])
            mean = {key: mean[key] + g[key][0] / ig_steps for key in probes}
            bar.update(1)
        grads = {key: (mean[key], grads[key][1]) for key in probes}
    est = {key: _estimate(deltas[key], grads, key, sites[key], model, key in fixed) for key in sites}
    drop = {}
    if grad_drop:
        for layer in range(n_layers):
            stop = [(Site(c, layer), _StopGrad()) for c in ("attn_out", "mlp_out")]
            g, _, _ = _gradients(model, data.base, probes, metric_fn, ref, stop, first=False)
            for key in sites:
                est_l = _estimate(deltas[key], g, key, sites[key], model, key in fixed)
                drop[key] = drop.get(key, 0) + est_l.abs() / max(1, n_layers - 1)
            bar.update(1)
    return est, drop, base_m.detach(), source_m.detach()


def _name(key) -> str:
    return "/".join(map(str, key))


def _gradients(model, prompts, probes, metric_fn, ref, extra=(), first: bool = True):
    """One forward with a probe at every site and one backward of the metric's sum:
    ``({key: (grad, valid)}, {key: (value, valid)}, next-token logits)``. ``extra`` nodes
    run before the probes (``first``) or after them."""
    g = Graph()
    ops = {}
    if first:
        for site, op in extra:
            g.add(Site(site.component, site.layer, positions="all"), op)
    for key, sel in probes.items():
        ops[key] = _Probe()
        g.add(Site(key[0], key[1], positions=sel), ops[key], name=_name(key))
    if not first:
        for site, op in extra:
            g.add(Site(site.component, site.layer, positions="all"), op)
    out = run(g, model, prompts, grad=True, logits="last")
    logits = out.next_token_logits
    total = metric_fn(logits, ref).sum()
    keys = list(ops)
    grads = torch.autograd.grad(total, [ops[k].delta for k in keys], allow_unused=True)
    valid = {k: _valid_of(out, probes[k]) for k in keys}
    result = {k: (torch.zeros_like(ops[k].value) if gr is None else gr, valid[k]) for k, gr in zip(keys, grads)}
    values = {k: (ops[k].value, valid[k]) for k in keys}
    return result, values, logits.detach()


def _valid_of(out, selector):
    """The valid mask of an edit node's positions (the engine records it for collectors only)."""
    mask = out.attention_mask[out.rows["base"]]
    start, length = mask.argmax(1), mask.sum(1)
    return resolve_positions(selector, start, length).valid


def _estimate(delta, grads, key, selector, model, qk: bool) -> torch.Tensor:
    """Per-row estimates ``[B, (k,) (heads)]`` from a site's difference and gradient; with
    ``qk`` (the QK fix) ``delta`` is ``z' - z`` ``[m, B, S, H, dh]`` and the gradient is z's."""
    if qk:
        return _qk_estimate(delta, grads[("head_out", key[1], "qk")], key, selector, model)
    grad, valid = grads[key]
    prod = (delta * grad).sum(-1)                       # [B, k, (H)]
    mask = valid.to(prod.device).reshape(*valid.shape, *([1] * (prod.dim() - 2)))
    prod = prod * mask
    return prod.sum(1) if selector == "all" else prod


def _block_inputs(model, prompts) -> tuple:
    """Every block's input for ``prompts`` (right-padded), from one plain forward."""
    inputs, _ = tokenize(model, {"base": prompts}, "right")
    with torch.no_grad():
        out = model.hf(**{k: v.to(model.device) for k, v in inputs.items()}, output_hidden_states=True)
    return out.hidden_states


def _qk_delta(model, prompts, component, layer, selector, source, hidden, z, z_valid, memory_mb):
    """``z' - z`` at ``layer`` for the QK fix: ``[m, B, S, H, dh]`` with m = 1 for queries
    (every selected query patched at once) and one row block per key position for keys.
    The runs start at ``layer`` from ``hidden[layer]`` and stop after it."""
    B, S = z.shape[:2]
    if selector == "all":
        col = src_cols = torch.arange(S).expand(B, -1)    # [B, S] prompt positions
        ok = z_valid
    else:
        col = _prompt_index(selector, z_valid)
        src_cols = torch.arange(len(selector)).expand(B, -1)
        ok = torch.ones(B, len(selector), dtype=torch.bool)
    rows = torch.arange(B)[:, None].expand_as(col)
    if component == "q":
        groups = [(col, src_cols, ok)]
    else:  # one replica of the batch per key position
        groups = [(col[:, i:i + 1], src_cols[:, i:i + 1], ok[:, i:i + 1]) for i in range(col.shape[1])]
    per_chunk = max(1, int(memory_mb * 2**20 // (B * row_bytes(model, S))))   # replicas per forward
    width = source.shape[2:]
    with torch.no_grad():
        out = []
        for lo in range(0, len(groups), per_chunk):
            part = groups[lo:lo + per_chunk]
            m = len(part)
            value = torch.zeros(m, B, S, *width)
            where = torch.zeros(m, B, S, *width[:-1], 1, dtype=torch.bool)
            for i, (c, sc, k) in enumerate(part):
                r, c, sc = rows[:, :c.shape[1]][k], c[k], sc[k]
                value[i, r, c] = source[r, sc].to(value.dtype)
                where[i, r, c] = True
            g = Graph()
            g.add(Site(component, layer, positions="all"), Set(value.flatten(0, 1), mask=where.flatten(0, 1)))
            g.add(Site("head_out", layer, positions="all"), Collect(), name="z")
            rep_inputs, rep_batch = tokenize(model, {"base": list(prompts) * m}, "right")
            skip = Skip(layer, hidden[layer].repeat(m, 1, 1)) if layer else None
            _, collected = executor(model).forward(compile_graph(g, model.arch).bind(rep_batch), rep_inputs,
                                                   output=None, skip=skip)
            out.append(collected["z"][0].view(m, B, *z.shape[1:]) - z[None])
    return torch.cat(out)


def _prompt_index(selector: tuple, valid: torch.Tensor) -> torch.Tensor:
    """``[B, k]`` prompt-relative indices of ``selector``'s positions in each row (``valid``: the
    rows' ``[B, S]`` mask of real positions)."""
    length = valid.sum(1)
    return resolve_positions(selector, torch.zeros_like(length), length).index


def _qk_estimate(dz, grad_z, key, selector, model) -> torch.Tensor:
    grad, valid = grad_z
    contrib = (dz * grad[None]).sum(-1) * valid[None, :, :, None].to(dz.dtype)   # [m, B, S, H]
    component, layer = key
    if component == "q":
        if selector == "all":
            return contrib[0].sum(1)
        col = _prompt_index(selector, valid)
        return contrib[0].gather(1, col[..., None].expand(-1, -1, contrib.shape[-1]))   # [B, k, H]
    per_query = contrib.sum(2)                            # [m, B, H]: each key position's effect
    n_q, n_kv = per_query.shape[-1], model.arch.heads("k", layer)
    per_kv = per_query.view(*per_query.shape[:-1], n_kv, n_q // n_kv).sum(-1)   # query head h reads kv head h // (n_q / n_kv)
    per_kv = per_kv.transpose(0, 1)                       # [B, m, H_kv]
    return per_kv.sum(1) if selector == "all" else per_kv
