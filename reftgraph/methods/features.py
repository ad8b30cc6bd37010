"""Features: read a model in a dictionary's units, explain ReFT in them, attribute and find circuits of them.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> sae = rg.Dictionary(32, 64, activation="topk", k=4, seed=0)
>>> table = activations(lm, ["the cat sat", "a dog"], rg.Site("resid_post", layer=1), sae)
>>> table.columns.tolist()
['row', 'position', 'token', 'feature', 'activation']

A dictionary (:class:`~reftgraph.Dictionary`, read from a file by :func:`load`) is a basis
for any op (``rg.Ablate("zero", basis=sae)``, ``rg.Add(5.0, basis=sae)`` with the node's
``subspace`` naming feature ids). This module adds what users of features do next:
:func:`activations` and :func:`top_contexts` (what fires where), :func:`explain` (which
features a trained ReFT or steering node writes along), :func:`reft` (a ReFT op restricted to
chosen features' directions), :func:`attribute` (AtP over features and error nodes, as in
Marks et al. 2024, "Sparse Feature Circuits") and :func:`discover` (a feature circuit as a
runnable graph) with :func:`faithfulness`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, Union

import pandas as pd
import torch

from ..core.graph import Graph, Node
from ..core.masks import masked_mean
from ..core.ops import Ablate, Collect, Dictionary, Patch, Set
from ..core.ops.base import Op
from ..core.ops.reft import REFT_OPS, orthonormal_columns
from ..core.sites import Site, resolve_positions
from ..engine import as_model, compile_graph, run
from ..errors import DataError
from ..files.dictionaries import load
from ..training.counterfactual import Counterfactual
from ..viz.progress import progress_bar
from .edge_circuits import metric_runs
from .patching.attribution import check_metric, equal_lengths, one_length, positions_in, probe
from .patching.metrics import Reference, get_metric

__all__ = ["load", "activations", "top_contexts", "explain", "reft", "attribute", "discover", "FeatureCircuit",
           "faithfulness"]

STREAM = "corrupt"
ERRORS = ("keep", "ablate")
RANKS = ("effect", "magnitude", "mean_abs")


def _check_dictionary(dictionary, where: str = "dictionary") -> Dictionary:
    if not isinstance(dictionary, Dictionary):
        raise DataError(f"{where} must be a reftgraph.Dictionary (rg.features.load reads one), "
                        f"got {type(dictionary).__name__}")
    return dictionary


def _read(model, prompts, site: Site, dictionary: Dictionary, features, batch_size: int, progress: bool):
    """``(tokens, hits)``: each prompt's token ids and the ``(row, position, feature, activation)``
    of every non-zero feature activation at ``site`` (at its positions; positions in the prompt)."""
    _check_dictionary(dictionary)
    if isinstance(prompts, str) or not prompts:
        raise DataError(f"prompts must be a non-empty list of strings, got {prompts!r:.60}")
    ids = None if features is None else tuple(int(i) for i in features)
    g = Graph()
    g.add(replace(site, subspace=ids), Collect(basis=dictionary), name="features")
    tokens, hits = [], []
    with progress_bar(total=len(prompts), desc="features", progress=progress, unit="prompt") as bar:
        for start in range(0, len(prompts), batch_size):
            out = run(g, model, list(prompts[start:start + batch_size]), grad=False)
            f, valid = out["features"].float(), out.valid["features"]
            mask = out.attention_mask[out.rows["base"]]
            first, length = mask.argmax(1), mask.sum(1)
            where = resolve_positions(site.positions, first, length).index - first[:, None]   # prompt positions
            tokens += [row[m.bool()].tolist() for row, m in zip(out.input_ids[out.rows["base"]], mask)]
            b, p, i = ((f != 0) & valid[..., None]).nonzero(as_tuple=True)
            feature = i if ids is None else torch.tensor(ids)[i]
            hits.append(torch.stack([(b + start).float(), where[b, p].float(), feature.float(), f[b, p, i]], 1))
            bar.update(len(prompts[start:start + batch_size]))
    return tokens, torch.cat(hits)


def activations(model, prompts: Sequence[str], site: Site, dictionary: Dictionary, features=None,
                batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Every non-zero feature activation at ``site`` over ``prompts``: one row per (prompt, token, feature).

    >>> import reftgraph as rg
    >>> sae = rg.Dictionary(32, 64, activation="topk", k=4, seed=0)
    >>> t = activations(rg.models.tiny("llama"), ["abc"], rg.Site("resid_post", layer=1), sae, progress=False)
    >>> int(t.groupby("position").size().max()) <= 4          # TopK: at most k per token
    True

    Columns ``row`` (index into ``prompts``), ``position`` (token index in the prompt),
    ``token`` (its text), ``feature`` and ``activation``, at the site's positions (e.g.
    ``positions=slice(1, None)`` leaves out the first token, the attention sink, whose
    activations are often far larger); ``features`` (ids) keeps only those features.
    """
    model = as_model(model)
    tokens, hits = _read(model, prompts, site, dictionary, features, batch_size, progress)
    return _table(model, tokens, hits)


def _table(model, tokens: list, hits: torch.Tensor) -> pd.DataFrame:
    rows, pos = hits[:, 0].long().tolist(), hits[:, 1].long().tolist()
    text = _texts(model)
    return pd.DataFrame({"row": rows, "position": pos, "token": [text(tokens[r][p]) for r, p in zip(rows, pos)],
                         "feature": hits[:, 2].long().tolist(), "activation": hits[:, 3].tolist()})


def _texts(model):
    cache: dict = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = model.tokenizer.decode([token_id])
        return cache[token_id]

    return text


def top_contexts(model, prompts: Sequence[str], site: Site, dictionary: Dictionary, features=None, k: int = 5,
                 window: int = 8, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Each feature's ``k`` strongest activations over ``prompts``, with the text around them.

    >>> import reftgraph as rg
    >>> sae = rg.Dictionary(32, 64, activation="topk", k=4, seed=0)
    >>> t = top_contexts(rg.models.tiny("llama"), ["the cat sat", "a dog ran"], rg.Site("resid_post", layer=1),
    ...                  sae, features=[1, 2], k=2, progress=False)
    >>> t.columns.tolist()
    ['feature', 'rank', 'activation', 'row', 'position', 'token', 'context']

    ``context`` is up to ``window`` tokens before the token, the token itself in ``«»``,
    and two tokens after; ``features`` (ids) limits the table to those features (default:
    every feature that fires); positions as in :func:`activations`.
    """
    model = as_model(model)
    tokens, hits = _read(model, prompts, site, dictionary, features, batch_size, progress)
    table = _table(model, tokens, hits)
    top = (table.sort_values(["feature", "activation"], ascending=[True, False], kind="stable")
           .groupby("feature", sort=True).head(k).reset_index(drop=True))
    top.insert(1, "rank", top.groupby("feature").cumcount())
    text = _texts(model)

    def context(row, pos):
        ids = tokens[row]
        before = "".join(text(t) for t in ids[max(0, pos - window):pos])
        after = "".join(text(t) for t in ids[pos + 1:pos + 3])
        return f"{before}«{text(ids[pos])}»{after}"

    top["context"] = [context(r, p) for r, p in zip(top["row"], top["position"])]
    return top[["feature", "rank", "activation", "row", "position", "token", "context"]]


def _directions(target) -> torch.Tensor:
    """The rows an op writes along: R for the ReFT family and Rotate, the vector for Add."""
    op = target.op if isinstance(target, Node) else target
    dims = target.site.subspace if isinstance(target, Node) and op.learned_basis else None
    if hasattr(op, "R"):
        return op.R(dims).detach().float()
    if hasattr(op, "vector") and op.basis is None and op.vector.dim() == 1:
        return op.vector.detach().float()[None]
    raise DataError(f"explain reads the directions a node writes along: a ReFT op (R), Rotate or an Add of one "
                    f"vector, got {type(op).__name__}")


def explain(target, dictionary: Dictionary, top: int = 10) -> pd.DataFrame:
    """The features whose decoder directions lie most in the subspace a node edits.

    >>> import reftgraph as rg
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> op = reft(sae, [7, 9], rank=2)          # a LoReFT inside features 7 and 9's span
    >>> explain(op, sae, top=2)["feature"].tolist()
    [7, 9]

    ``target``: a node (its ``subspace`` picks rows of R) or an op: the ReFT family and
    ``Rotate`` (the row space of R), ``Add`` (its vector). Columns: ``feature``, ``cosine``
    (the norm of the unit decoder direction's projection on that space: 1 inside it, about
    ``sqrt(rank / width)`` at random), ``direction`` (the row of R it is closest to) and
    ``signed`` (its cosine with that row: the sign says whether raising the row's coordinate
    writes the feature or its opposite). Sorted by ``cosine``, ``top`` rows.
    """
    _check_dictionary(dictionary)
    rows = _directions(target)
    if rows.shape[-1] != dictionary.d_out:
        raise DataError(f"the node writes width {rows.shape[-1]}; {dictionary.label} decodes to width "
                        f"{dictionary.d_out}")
    basis = orthonormal_columns(rows.T.double()).float()         # [width, r]
    dec = dictionary.W_dec.float()
    dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (dec @ basis).norm(dim=-1)
    signed = dec @ (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T     # [d_sae, r]
    best = signed.abs().argmax(-1)
    order = cosine.argsort(descending=True)[:top]
    return pd.DataFrame({"feature": order.tolist(), "cosine": cosine[order].tolist(),
                         "direction": best[order].tolist(),
                         "signed": signed[order, best[order]].tolist()})


def reft(dictionary: Dictionary, features: Sequence[int], rank: Optional[int] = None, kind: str = "LoReFT",
         act: str = "identity", seed: Optional[int] = None) -> Op:
    """A ReFT op whose R lies in the span of the decoder directions of ``features``.

    >>> import reftgraph as rg
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> op = reft(sae, [3, 5, 8], rank=2)
    >>> R, D = op.R(), sae.W_dec[[3, 5, 8]]
    >>> bool(torch.allclose(R @ torch.linalg.pinv(D) @ D, R, atol=1e-5))   # rows inside the span
    True

    ``kind``: any of the ReFT family (``"LoReFT"``, ``"DiReFT"``, ...); ``rank``: default the
    number of features. Put it at the dictionary's site and train it like any other op.
    """
    _check_dictionary(dictionary)
    if kind not in REFT_OPS:
        raise DataError(f"kind must be one of {sorted(REFT_OPS)}, got {kind!r}")
    ids = [int(i) for i in features]
    bad = [i for i in ids if not 0 <= i < dictionary.d_sae]
    if not ids or bad:
        raise DataError(f"features must be ids in 0..{dictionary.d_sae - 1} ({dictionary.label}), got {list(features)}")
    within = dictionary.W_dec[ids].T.float()
    return REFT_OPS[kind](width=dictionary.d_out, rank=rank or len(ids), act=act, seed=seed, within=within)


def _site_dictionaries(dictionaries) -> dict:
    """``{Site: Dictionary}`` from a mapping, or from dictionaries that name where they were trained."""
    if isinstance(dictionaries, Dictionary):
        dictionaries = [dictionaries]
    if isinstance(dictionaries, dict):
        items = list(dictionaries.items())
    else:
        items = []
        for d in dictionaries:
            _check_dictionary(d, "each dictionary")
            if not d.trained_at:
                raise DataError(f"{d.label} does not say where it was trained (trained_at); pass "
                                "{rg.Site(component, layer): dictionary} instead")
            component, layer = d.trained_at.rstrip("]").split("[")
            items.append((Site(component, int(layer)), d))
    if not items:
        raise DataError("dictionaries is empty: give at least one {site: dictionary}")
    out = {}
    for site, d in items:
        if not isinstance(site, Site):
            raise DataError(f"dictionaries maps rg.Site to rg.Dictionary; got a key {site!r}")
        _check_dictionary(d, f"dictionaries[{site.component}[{site.layer}]]")
        out[Site(site.component, site.layer)] = d
    return out


def _name(site: Site) -> str:
    return f"{site.component}{site.layer}"


def attribute(model, data: Counterfactual, dictionaries, metric="logit_diff", method: str = "atp", steps: int = 5,
              batch_size: int = 16, progress: bool = True, per_position: bool = False) -> pd.DataFrame:
    """Every feature's (and each site's error's) estimated effect of corrupting it in the clean run.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> t = attribute(lm, data, {rg.Site("resid_post", 0): sae}, progress=False)
    >>> t.columns.tolist(), len(t)                    # 64 features and the error node
    (['site', 'feature', 'estimate', 'mean_abs'], 65)

    ``data`` as for circuits: ``data.source`` the clean prompts, ``data.base`` the corrupted
    ones, of equal token lengths row by row. ``dictionaries``: ``{rg.Site(component, layer):
    dictionary}`` (or dictionaries that say where they were trained; a transcoder at its
    ``mlp_out``, its features read from the MLP's input). ``method="atp"``: a
    feature's estimate is ``sum over tokens (f_corrupt - f_clean) * dM/df`` at the clean run,
    averaged over rows, and the error node's ``(e_corrupt - e_clean) . dM/dh`` with
    ``e = h - x_hat`` (Marks et al. 2024); ``dM/df`` is ``dM/dh`` along the feature's decoder
    direction. ``method="ig"``: the gradient averaged over ``steps`` runs whose site (one site
    at a time) goes from its clean to its corrupted value, the rest of the model run as it
    follows (integrated gradients; a transcoder's ``mlp_out = decode(f) + e`` is affine in its
    features and error, which move along their straight line). ``feature`` is ``-1`` for the error node.
    ``per_position=True`` scores each feature (and error) at each token position apart (a
    ``position`` column; prompts of one length, so a position is the same token in every row):
    the nodes of Marks et al.'s circuits on templated data. ``mean_abs`` is the mean over rows of
    each row's ``|estimate|``: a feature that matters in every row but with a sign that depends on
    the row (a name's feature, for the name that is the answer in some rows and not in others)
    has a small ``estimate`` and a large ``mean_abs``.
    """
    model = as_model(model, one_stack="rg.features.attribute")
    if not isinstance(data, Counterfactual):
        raise DataError(f"attribute takes a rg.patching.Counterfactual (base = corrupted, source = clean), "
                        f"got {type(data).__name__}")
    if method not in ("atp", "ig"):
        raise DataError(f"method must be 'atp' or 'ig', got {method!r}")
    if method == "ig" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise DataError(f"steps must be an int >= 1, got {steps!r}")
    sites = _site_dictionaries(dictionaries)
    metric_name, metric_fn = get_metric(metric)
    equal_lengths(model, data, "feature attribution compares the clean and corrupted runs token for token: it "
                  "needs base and source prompts of equal length")
    width = one_length(model, data) if per_position else None
    correct, wrong = data.answer_ids(model, required=False)
    check_metric(metric_fn, Reference(correct, wrong), model)
    _check_sites(model, sites)
    totals = {site: torch.zeros(2, *((width,) if width else ()), d.d_sae + 1, dtype=torch.float64)
              for site, d in sites.items()}      # [0]: the rows' estimates summed, [1]: their |estimates|
    n = len(data)
    passes = 2 + (steps * len(sites) if method == "ig" else 0)
    with progress_bar(total=passes * -(-n // batch_size), desc="feature attribution", progress=progress,
                      unit="pass") as bar:
        for lo in range(0, n, batch_size):
            part = data.rows(slice(lo, lo + batch_size))
            ref = Reference(*(None if t is None else t[lo:lo + batch_size] for t in (correct, wrong)))
            _chunk(model, part, ref, sites, metric_fn, method, steps, totals, bar)
    features = {site: list(range(d.d_sae)) + [-1] for site, d in sites.items()}
    frames = []
    for site in sites:
        mean, mean_abs = (totals[site] / n).flatten(1).tolist()
        columns = {"site": f"{site.component}[{site.layer}]", "feature": features[site] * (width or 1)}
        if width:
            columns["position"] = [p for p in range(width) for _ in features[site]]
        frames.append(pd.DataFrame({**columns, "estimate": mean, "mean_abs": mean_abs}))
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(metric=metric_name, method="AtP" if method == "atp" else f"IG{steps}")
    return out


def _check_sites(model, sites: dict) -> None:
    g = Graph()
    for site, d in sites.items():
        g.add(replace(site, positions="all"), Collect(basis=d), name=_name(site))
    compile_graph(g, model.arch)   # the engine's checks (widths, where each was trained), before any forward


def _collect(model, prompts, sites) -> dict:
    """``{site: (value [B, S, width], features [B, S, d_sae], valid [B, S])}`` at every position."""
    read = Graph()
    for site, d in sites.items():
        read.add(replace(site, positions="all"), Collect(), name=_name(site))
        read.add(replace(site, positions="all"), Collect(basis=d), name=_name(site) + "f")
    out = run(read, model, prompts, grad=False)
    return {site: (out[_name(site)].float(), out[_name(site) + "f"].float(), out.valid[_name(site)]) for site in sites}


def _gradients(model, prompts, ref, metric_fn, sites: dict, before=(), features: bool = True) -> tuple:
    """``({site: dM/dh [B, S, width]}, {site: (h, features)})`` from one forward and backward,
    with ``before`` nodes (``(site, op)``) applied first; ``features=False`` leaves the
    features out (None)."""
    g, probes = Graph(), {}
    for site, op in before:
        g.add(replace(site, positions="all"), op)
    for site, d in sites.items():
        if features:
            g.add(replace(site, positions="all"), Collect(basis=d), name=_name(site) + "f")
        probes[site] = probe()
        g.add(replace(site, positions="all"), probes[site], name=_name(site))
    out = run(g, model, prompts, grad=True)
    grads = torch.autograd.grad(metric_fn(out.next_token_logits, ref).sum(), [p.delta for p in probes.values()],
                                allow_unused=True)
    values = {site: (p.value.float(), out[_name(site) + "f"].detach().float() if features else None)
              for site, p in probes.items()}
    return {site: torch.zeros_like(values[site][0]) if grad is None else grad.float()
            for site, grad in zip(sites, grads)}, values


def _chunk(model, data, ref, sites, metric_fn, method, steps, totals, bar) -> None:
    """Add one chunk of rows' summed estimates to ``totals`` (features, then the error)."""
    corrupt = _collect(model, data.base, sites)
    bar.update(1)
    grads, clean = _gradients(model, data.source, ref, metric_fn, sites)   # the clean run: AtP's gradients
    bar.update(1)
    if method == "ig":
        for site, d in sites.items():
            (h1, _, valid), h0 = corrupt[site], clean[site][0]
            mean = 0
            for k in range(steps):
                at = Set(h0 + (k + 0.5) / steps * (h1 - h0), mask=valid[..., None])
                mean = mean + _gradients(model, data.source, ref, metric_fn, {site: d}, [(site, at)],
                                         features=False)[0][site] / steps
                bar.update(1)
            grads[site] = mean
    for site, d in sites.items():
        (h1, f1, valid), (h0, f0) = corrupt[site], clean[site]
        keep = valid[..., None].float()
        with torch.no_grad():
            g_f = grads[site] @ d.directions().T          # dM/df: dM/dh along each decoder direction
            features = (f1 - f0) * g_f * keep
            error = (((h1 - d.decode(f1)) - (h0 - d.decode(f0))) * grads[site] * keep).sum(-1, keepdim=True)
            rows = torch.cat([features, error], -1)       # [B, S, d_sae + 1]: each row's estimates
            if totals[site].dim() == 2:                   # (not per position: a row's tokens summed)
                rows = rows.sum(1)
        totals[site] += torch.stack([rows.sum(0), rows.abs().sum(0)]).double()


class FeatureCircuit(Graph):
    """A feature circuit: the graph that runs it, with the features it keeps and its settings.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> c = discover(lm, data, {rg.Site("resid_post", 0): rg.Dictionary(32, 64, seed=0)}, size=4, progress=False)
    >>> len(c.kept), c.settings["errors"]
    (4, 'keep')

    Run on the clean prompts with stream ``"corrupt"`` (the corrupted prompts): at each site
    the features outside the circuit take their corrupted values (or their mean over the
    corrupted prompts), the error node is kept or corrupted, and the reconstruction error
    otherwise stays. ``kept`` lists the circuit's features (``site``, ``feature``,
    ``estimate``, ``score``).
    """

    def __init__(self, nodes=(), kept: Optional[pd.DataFrame] = None, settings: Optional[dict] = None,
                 dictionaries: Optional[dict] = None):
        super().__init__(nodes)
        self.kept = kept if kept is not None else pd.DataFrame(columns=["site", "feature", "estimate", "score"])
        self.settings = dict(settings or {})
        self.dictionaries = dict(dictionaries or {})   # {Site: Dictionary}: the sites it runs on

    def __repr__(self) -> str:
        total, positions = self.settings.get("features", "?"), self.settings.get("positions")
        units = f"{total} features x {positions} positions" if positions else f"{total} features"
        lines = [f"FeatureCircuit: keeps {len(self.kept)} of {units} at "
                 f"{len(self.settings.get('sites', ()))} sites; errors {self.settings.get('errors')}"]
        lines += [f"  {n.name}: {type(n.op).__name__} {n.site}" for n in self.nodes[:8]]
        return "\n".join(lines)


def _count(size, n: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0 or (
            isinstance(size, float) and size > 1) or (isinstance(size, int) and size > n):
        raise DataError(f"size must be a number of features in 1..{n} (int) or a fraction in (0, 1] (float), "
                        f"got {size!r}")
    return size if isinstance(size, int) else max(1, round(size * n))


def discover(model, data: Counterfactual, dictionaries, size: Union[int, float] = 0.01, errors: str = "keep",
             ablate: str = "corrupt", metric="logit_diff", method: str = "atp", steps: int = 5,
             table: Optional[pd.DataFrame] = None, batch_size: int = 16, progress: bool = True,
             per_position: bool = False, rank: str = "effect") -> FeatureCircuit:
    """The circuit of the ``size`` features with the largest estimated effect, as a runnable graph.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> c = discover(lm, data, {rg.Site("resid_post", 0): sae}, size=0.05, progress=False)
    >>> round(faithfulness(c, lm, data, progress=False)["faithfulness"], 3) >= 0
    True

    ``size``: features (int) or a fraction of all features at the sites (float); the
    features whose corruption lowers the metric most (``-estimate`` of :func:`attribute`)
    are kept (``rank="magnitude"``: the largest ``|estimate|``, either sign, as Marks et al.
    keep nodes; ``rank="mean_abs"``: the largest ``mean_abs``, the features that matter most
    row by row, whichever way). ``errors``: ``"keep"`` (each site's reconstruction error
    stays clean) or ``"ablate"`` (it takes the corrupted run's error: the circuit then has
    only its features); ``ablate``: ``"corrupt"`` (outside features read stream ``"corrupt"``) or
    ``"mean"`` (their mean over the corrupted prompts, stored in the graph; errors kept;
    per position in a per-position circuit, as node circuits take theirs).
    ``method`` and ``steps`` as in :func:`attribute`; ``table``: scores from it, to reuse them
    across sizes. ``per_position=True`` (or a ``table`` with a ``position`` column) makes the
    circuit's units (feature, token position) pairs, as Marks et al. count nodes on templated
    data: ``size`` then counts pairs, of all ``features x positions``.
    """
    model = as_model(model, one_stack="rg.features.discover")
    sites = _site_dictionaries(dictionaries)
    if errors not in ERRORS:
        raise DataError(f"errors must be one of {ERRORS}, got {errors!r}")
    if rank not in RANKS:
        raise DataError(f"rank must be one of {RANKS}, got {rank!r}")
    if ablate not in ("corrupt", "mean"):
        raise DataError(f"ablate must be 'corrupt' or 'mean', got {ablate!r}")
    if ablate == "mean" and errors == "ablate":
        raise DataError("errors='ablate' takes the corrupted run's error; with ablate='mean' keep the errors")
    if table is None:
        table = attribute(model, data, sites, metric=metric, method=method, steps=steps, batch_size=batch_size,
                          progress=progress, per_position=per_position)
    positions = positions_in(table)
    n = sum(d.d_sae for d in sites.values()) * (positions or 1)
    count = _count(size, n)
    if rank == "mean_abs" and "mean_abs" not in table:
        raise DataError("rank='mean_abs' needs the table's mean_abs column (from rg.features.attribute)")
    scores = {"effect": lambda t: -t["estimate"], "magnitude": lambda t: t["estimate"].abs(),
              "mean_abs": lambda t: t["mean_abs"]}
    scored = table[table["feature"] >= 0].assign(score=scores[rank])
    kept = scored.sort_values("score", ascending=False, kind="stable").head(count).reset_index(drop=True)
    graph = circuit_graph(model, data, sites, kept, errors, ablate, positions)
    graph.settings.update(size=size, metric=metric if isinstance(metric, str) else "custom", units=n, rank=rank,
                          method=table.attrs.get("method", "given"))
    return graph


def circuit_graph(model, data: Optional[Counterfactual], dictionaries, kept: pd.DataFrame, errors: str = "keep",
                  ablate: str = "corrupt", positions: Optional[int] = None) -> FeatureCircuit:
    """The graph of a feature circuit that keeps the features in ``kept`` (``site``, ``feature``).

    >>> import pandas as pd, reftgraph as rg
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> c = circuit_graph(rg.models.tiny("llama"), None, {rg.Site("resid_post", 1): sae},
    ...                   pd.DataFrame({"site": ["resid_post[1]"], "feature": [5]}))
    >>> c.nodes[0].site.subspace[:6]                      # every feature but 5 reads the corrupted run
    (0, 1, 2, 3, 4, 6)

    ``positions``: the prompts' token count, for a circuit of (feature, position) pairs
    (``kept`` then has a ``position`` column): one node per position, each with the features
    kept there.
    """
    model = as_model(model)
    sites = _site_dictionaries(dictionaries)
    if positions is None and "position" in kept:
        raise DataError("kept lists (feature, position) pairs: pass positions=, the prompts' token count")
    nodes = []
    means = _feature_means(model, data, sites, positions is not None) if ablate == "mean" else {}
    for site, d in sites.items():
        here = kept.loc[kept["site"] == f"{site.component}[{site.layer}]"]
        for at in ("all",) if positions is None else range(positions):
            inside = set(int(f) for f in (here if at == "all" else here.loc[here["position"] == at])["feature"])
            outside = tuple(i for i in range(d.d_sae) if i not in inside)
            if not outside and errors == "keep":
                continue
            if ablate == "mean":
                op = Ablate("mean", value=(means[site] if at == "all" else means[site][at])[list(outside)], basis=d)
            else:
                # (every feature kept: the node corrupts the error alone)
                op = Patch(STREAM, basis=d, error=errors == "ablate", features=bool(outside))
            name = f"outside_{_name(site)}" + ("" if at == "all" else f"_p{at}")
            nodes.append(Node(name, Site(site.component, site.layer, positions=at if at == "all" else [at],
                                         subspace=outside or None), op))
    return FeatureCircuit(nodes, kept.reset_index(drop=True),
                          {"errors": errors, "ablate": ablate, "sites": [f"{s.component}[{s.layer}]" for s in sites],
                           "features": sum(d.d_sae for d in sites.values()), "positions": positions}, sites)


def _feature_means(model, data, sites, per_position: bool = False) -> dict:
    """Each site's features averaged over the corrupted prompts: over rows and tokens
    ``[d_sae]``, or over rows at each position ``[tokens, d_sae]`` (as node circuits do)."""
    if data is None:
        raise DataError("ablate='mean' needs the data, whose corrupted prompts give the means")
    g = Graph()
    for site, d in sites.items():
        g.add(replace(site, positions="all"), Collect(basis=d), name=_name(site))
    out = run(g, model, data.base, grad=False)
    over = (0,) if per_position else (0, 1)
    return {site: masked_mean(out[_name(site)].float(), out.valid[_name(site)], over) for site in sites}


def faithfulness(circuit: FeatureCircuit, model, data: Counterfactual, metric="logit_diff",
                 progress: bool = True) -> dict:
    """Run a feature circuit on the clean prompts and compare it with the full model and the empty circuit.

    >>> import pandas as pd, reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    >>> sae = rg.Dictionary(32, 64, seed=0)
    >>> every = pd.DataFrame({"site": "resid_post[0]", "feature": range(64)})
    >>> round(faithfulness(circuit_graph(lm, data, {rg.Site("resid_post", 0): sae}, every), lm, data,
    ...                    progress=False)["faithfulness"], 6)
    1.0

    Returns ``circuit``, ``full`` (the clean run), ``empty`` (every feature at the sites
    corrupted, errors as in the circuit), ``faithfulness = (circuit - empty) / (full - empty)``
    (the fraction of the clean behaviour the circuit recovers) and ``size``.
    """
    model = as_model(model)
    if not isinstance(circuit, FeatureCircuit):
        raise DataError(f"faithfulness takes a FeatureCircuit (from discover or circuit_graph), got "
                        f"{type(circuit).__name__}")
    settings, sites = circuit.settings, circuit.dictionaries
    empty = circuit_graph(model, data, sites, circuit.kept.iloc[:0], settings.get("errors", "keep"),
                          settings.get("ablate", "corrupt"), settings.get("positions"))
    full, (value, nothing) = metric_runs(model, data, [circuit, empty], metric, progress)
    return {"size": len(circuit.kept), "circuit": value, "full": full, "empty": nothing,
            "faithfulness": (value - nothing) / (full - nothing)}
