"""Graph -> plan -> nnsight edits.

``compile_graph`` checks every node against the model (layers, heads, widths,
subspaces, source order) and orders the edits by the model's forward order.
``bind`` resolves positions against one tokenized batch (rows of several streams).
``apply`` performs the edits inside ``model.trace(...)`` (or on plain modules).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=-1, positions="last"), rg.Collect(), name="m")
>>> [str(s.hook) for s in compile_graph(g, lm.arch).steps]
["Hook(layer=1, stage=24, path='mlp', io='output')"]
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..arch.structure import Arch, Hook
from ..core.graph import Graph, Node
from ..core.ops import Dictionary
from ..core.sites import KEY_COMPONENTS, STAGES, Site
from ..errors import SiteError
from .bind import BoundPlan, bind, where, with_subspaces


@dataclass(frozen=True, eq=False)
class Step:
    """One node resolved against a model: its hook, view functions, heads and dims (immutable).

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("k", layer=0, head=1, positions="last"), rg.Patch("source"), name="p")
    >>> step = compile_graph(g, rg.models.tiny("llama").arch).steps[0]
    >>> step.hook.path, step.heads.tolist(), step.source_hook == step.hook
    ('self_attn.k_proj', [1], True)
    """

    node: Node
    hook: Hook
    get: Callable
    put: Callable
    heads: Optional[torch.Tensor]
    dims: Optional[torch.Tensor]
    source_hook: Optional[Hook] = None
    source_get: Optional[Callable] = None
    source_heads: Optional[torch.Tensor] = None
    modules: tuple = ()   # block paths whose modules ``put`` calls (a receiver input recomputes its reader)
    input_hook: Optional[Hook] = None   # where the op's dictionary reads its own stream (a transcoder: the MLP's input)
    source_input_hook: Optional[Hook] = None   # where it reads the source stream's (a transcoder's Patch)


@dataclass(frozen=True, eq=False)
class Plan:
    """Steps in forward order; ``hooks`` lists every hook point the plan touches. A plan is
    immutable: :meth:`bind` resolves it against one batch.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_mid", layer=1), rg.Collect(), name="late")
    >>> _ = g.add(rg.Site("q", layer=0), rg.Collect(), name="early")
    >>> plan = compile_graph(g, rg.models.tiny("llama").arch)
    >>> [s.node.name for s in plan.steps], [(h.layer, h.path, h.io) for h in plan.hooks]
    (['early', 'late'], [(0, 'self_attn.q_proj', 'output'), (1, '', 'input'), (1, 'self_attn', 'output')])
    """

    arch: Arch
    steps: tuple
    hooks: tuple = ()
    edits: dict = field(default_factory=dict, init=False, repr=False)   # hook -> indices of the steps editing there
    reads: dict = field(default_factory=dict, init=False, repr=False)   # hook -> indices of the steps reading a source there
    inputs: dict = field(default_factory=dict, init=False, repr=False)  # hook -> steps whose dictionary reads there
    source_inputs: dict = field(default_factory=dict, init=False, repr=False)  # the same in their source streams
    eager: bool = field(default=False, init=False)  # a step touches attn_pattern: run in eager attention
    memo: dict = field(default_factory=dict, init=False, repr=False)    # bindings per batch layout (a cache)

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "hooks", tuple(self.hooks))
        # whether a step reads or edits a value only eager attention computes (attn_pattern):
        # the engine then runs the model with eager attention (decided once, not per call)
        object.__setattr__(self, "eager", any(
            s.node.site.component in KEY_COMPONENTS or
            (s.source_hook is not None and s.node.reads[1].component in KEY_COMPONENTS) for s in self.steps))
        for i, step in enumerate(self.steps):
            self.edits.setdefault(step.hook, []).append(i)
            if step.source_hook is not None and step.source_hook != step.hook:
                self.reads.setdefault(step.source_hook, []).append(i)
            if step.input_hook is not None:
                self.inputs.setdefault(step.input_hook, []).append(i)
            if step.source_input_hook is not None:
                self.source_inputs.setdefault(step.source_input_hook, []).append(i)

    def bind(self, batch, subspaces=None):
        """This plan resolved against ``batch``: a :class:`~reftgraph.engine.bind.BoundPlan`
        (every step's positions, checked before any forward; per-row ``subspaces`` as in
        :func:`reftgraph.run`).

        >>> import reftgraph as rg
        >>> from reftgraph.engine import Batch
        >>> g = rg.Graph()
        >>> _ = g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect())
        >>> bound = compile_graph(g, rg.models.tiny("llama").arch).bind(Batch.single([3, 2], 3))
        >>> bound.steps[0].index.tolist()     # row 0 at 0 * 3 + 2, row 1 at 1 * 3 + 1
        [[2], [4]]
        """
        return BoundPlan(self, batch, tuple(with_subspaces(self, bind(self, batch), batch, subspaces)))

    def __getstate__(self):   # a remote request carries no cached bindings
        return {**self.__dict__, "memo": {}}


def stack_arch(arch: Arch, site: Site, at: str = "") -> Arch:
    """The Arch of the stack ``site`` is in: an encoder-decoder's encoder or decoder (the
    default), else ``arch`` itself; a stack the model does not have is a :class:`SiteError`.

    >>> import reftgraph as rg
    >>> stack_arch(rg.models.tiny("t5").arch, rg.Site("resid_pre", 0, stack="encoder")).stack
    'encoder'
    """
    if not arch.stacks:
        if site.stack:
            raise SiteError(f"{at}stack={site.stack!r}: {arch.family.name} has one stack of blocks (only an "
                            "encoder-decoder has two); leave stack out")
        return arch
    return arch.stacks[site.stack or "decoder"]


def _check_site(node: Node, site: Site, arch: Arch, what: str = "") -> tuple[int, Optional[torch.Tensor]]:
    at = where(node) + what
    arch = stack_arch(arch, site, at)
    layer = arch.layer_index(site.layer)
    if layer is None:
        raise SiteError(f"{at}layer {site.layer} out of range; valid layers 0..{arch.n_layers - 1} "
                        f"(or -{arch.n_layers}..-1)")
    refused = arch.refusal(site.component, layer)
    if refused:
        raise SiteError(at + refused)
    heads = None
    if site.is_head:
        n = arch.heads(site.component, layer)
        kind = "key-value heads (grouped-query attention)" if (
            site.component in ("k", "v") and n != arch.heads("q", layer)) else "heads"
        if site.head is not None:
            bad = [h for h in site.head if not 0 <= h < n]
            if bad:
                raise SiteError(f"{at}head {bad[0]} out of range; {site.component} has {n} {kind}: "
                                f"valid heads 0..{n - 1}")
            heads = torch.tensor(site.head)
    return layer, heads


def _slice_width(node: Node, site: Site, arch: Arch, layer: int) -> Optional[int]:
    width = arch.width(site.component, layer)
    if width is None:   # one entry per token (attn_pattern's keys): no fixed width
        if site.subspace is not None or node.op.indexes_basis or node.op.expected_width() is not None:
            raise SiteError(f"{where(node)}{site.component} has one entry per key token, not a fixed width: "
                            f"{type(node.op).__name__}{' with subspace=' if site.subspace else ''} cannot edit it "
                            "(use Patch, Set, Ablate, Collect or an op without a width)")
        return None
    if site.subspace is None:
        return width
    if node.op.basis is not None:
        size = node.op.basis.d_sae
        bad = [d for d in site.subspace if d >= size]
        if bad:
            raise SiteError(f"{where(node)}feature id {bad[0]} out of range; {node.op.basis.label} has {size} "
                            f"features: valid ids 0..{size - 1}")
        return width
    if node.op.learned_basis:
        size = node.op.basis_size()
        bad = [d for d in site.subspace if d >= size]
        if bad:
            raise SiteError(f"{where(node)}subspace dim {bad[0]} beyond the rank of {type(node.op).__name__} "
                            f"({size}: valid dims 0..{size - 1})")
        return width
    bad = [d for d in site.subspace if d >= width]
    if bad:
        raise SiteError(f"{where(node)}subspace dim {bad[0]} beyond the width of {site.component} "
                        f"({width}: valid dims 0..{width - 1})")
    return len(site.subspace)


def _dictionary(op):
    """The dictionary a node's op uses: its basis, or the op itself when it is one (it splices)."""
    return op.basis if op.basis is not None else op if isinstance(op, Dictionary) else None


def _check_basis(node: Node, site: Site, arch: Arch, layer: int, width: Optional[int], need: Optional[int]) -> None:
    """A node whose op is or edits in a dictionary: the dictionary reads the site's width,
    was trained at this site (unless it is not strict), and an op in its basis has one entry
    per feature it sees in its own tensors."""
    basis, op = _dictionary(node.op), type(node.op).__name__
    if basis.reads:
        _check_transcoder(node, basis, site, arch, layer, width)
    elif basis.d_in != width or basis.d_out != width:
        raise SiteError(f"{where(node)}{basis.label} reads width {basis.d_in}"
                        f"{'' if basis.d_out == basis.d_in else f' and writes {basis.d_out}'}; {site.component} has "
                        f"width {width}")
    trained = basis.trained_at
    if trained and trained != f"{site.component}[{layer}]" and trained != f"{site.component}[{layer - arch.n_layers}]":
        message = (f"{where(node)}{basis.label} was trained at {trained}, not at {site.component}[{layer}]; "
                   "set strict=False on the dictionary to use it here anyway")
        if basis.strict:
            raise SiteError(message)
        warnings.warn(message, stacklevel=4)
    features = basis.d_sae if site.subspace is None else len(site.subspace)
    if basis is not node.op and need is not None and need != features:
        raise SiteError(f"{where(node)}{op} has width {need}, the features it edits need {features} "
                        + ("(the subspace's feature ids)" if site.subspace else f"({basis.label}'s features)"))


def _check_transcoder(node: Node, basis, site: Site, arch: Arch, layer: int, width: Optional[int]) -> None:
    """A transcoder reads the MLP's own input and writes at ``mlp_out`` of the same layer."""
    if site.component != "mlp_out":
        raise SiteError(f"{where(node)}{basis.label} is a transcoder: it reads the MLP's input and writes what the "
                        f"MLP adds, so its node sits at mlp_out, not at {site.component}")
    if node.op.reads_stream and (node.reads[1].component, node.reads[1].layer) != ("mlp_out", layer):
        raise SiteError(f"{where(node)}a {type(node.op).__name__} in a transcoder's basis reads the source stream's "
                        f"features from its MLP input, so its source site must be mlp_out of layer {layer} too, "
                        f"not {node.reads[1]}")
    if arch.mlp_input(layer) is None:
        raise SiteError(f"{where(node)}the MLP of layer {layer} has no per-token input a transcoder can read "
                        "(the block reshapes tokens around it)")
    if basis.d_in != arch.d_model or basis.d_out != width:
        raise SiteError(f"{where(node)}{basis.label} reads width {basis.d_in} and writes {basis.d_out}; the MLP reads "
                        f"{arch.d_model} and mlp_out has width {width}")


def compile_graph(graph: Graph, arch: Arch) -> Plan:
    """Check ``graph`` against ``arch`` and order its nodes in forward order.

    >>> import reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("head_out", layer=0, head=4), rg.Collect(), name="h")
    >>> compile_graph(g, rg.models.tiny("llama").arch)     # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: node 'h' at head_out[0].h4 pos=all: head 4 out of range; ... valid heads 0..3

    Plans are cached per graph, graph state (adding a node or setting an attribute of an
    op makes a new one: :meth:`~reftgraph.Graph.state`) and architecture: compiling an
    unchanged graph again returns the same plan; a changed one is checked again.
    """
    state = graph.state()
    cached = _PLANS.get(graph)
    if cached is not None and cached[0] is arch and cached[1] == state:
        return cached[2]
    graph.check()   # an op's settings may have changed since it was added
    plan = _compile(graph, arch)
    _PLANS[graph] = (arch, state, plan)
    return plan


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compile(graph: Graph, arch: Arch) -> Plan:
    steps = []
    for node in graph.nodes:
        site = node.site
        layer, heads = _check_site(node, site, arch)
        here = stack_arch(arch, site)
        width = _slice_width(node, site, here, layer)
        need = node.op.expected_width()
        dictionary = _dictionary(node.op)
        if dictionary is not None:
            _check_basis(node, site, here, layer, width, need)
        elif need is not None and need != width:
            raise SiteError(f"{where(node)}{type(node.op).__name__} has width {need}, the site needs {width} "
                            + ("(the subspace's dims)" if site.subspace else f"({site.component} width)"))
        at = here.locate(site.component, layer)
        hook = at.hook
        extra = {}
        if dictionary is not None and dictionary.reads:
            extra["input_hook"] = here.mlp_input(layer)
        if node.op.source is not None:
            src_site = node.reads[1]
            src_layer, extra["source_heads"] = _check_site(node, src_site, arch, f"source site {src_site}: ")
            src = stack_arch(arch, src_site).locate(src_site.component, src_layer)
            if src.width != at.width or ((src_site.head is None) != (site.head is None)) or (
                    src_site.head is not None and len(src_site.head) != len(site.head)):
                raise SiteError(f"{where(node)}source site {src_site} has another shape than the site")
            if src.hook.order > hook.order:
                raise SiteError(f"{where(node)}source site {src_site} comes after the site in the forward "
                                "pass; a patch can only read a place the model reaches first")
            extra.update(source_hook=src.hook, source_get=src.get)
            if dictionary is not None and dictionary.reads:    # a transcoder's source features: its MLP input
                extra["source_input_hook"] = here.mlp_input(layer)
        step = Step(node, hook, at.get, at.put, heads,
                    None if site.subspace is None or node.op.indexes_basis else torch.tensor(site.subspace),
                    modules=at.modules, **extra)
        steps.append(step)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    # at one hook, components in forward order (attn_out before resid_mid, which is written
    # through it: an edit at resid_mid never shows in attn_out), then insertion order
    steps.sort(key=lambda s: (*s.hook.order, STAGES[s.node.site.component], order[s.node.name]))
    hooks = {s.hook for s in steps} | {s.source_hook for s in steps if s.source_hook}
    hooks |= {h for s in steps for h in (s.input_hook, s.source_input_hook) if h}
    hooks |= {s.hook.at("", "input") for s in steps
              if stack_arch(arch, s.node.site).locate(s.node.site.component, s.hook.layer).needs_pre}
    hooks |= {s.source_hook.at("", "input") for s in steps if s.source_hook and stack_arch(
        arch, s.node.reads[1]).locate(s.node.reads[1].component, s.source_hook.layer).needs_pre}
    return Plan(arch, steps, sorted(hooks, key=lambda h: h.order))
