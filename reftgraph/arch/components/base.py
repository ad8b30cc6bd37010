"""What a component family implements, and the proof context it reads.

>>> from reftgraph.arch.components import component
>>> component("q").names, component("resid_mid").names
(('head_out', 'q', 'k', 'v'), ('resid_pre', 'resid_mid', 'resid_post'))

A :class:`Component` serves one family of component names. For one proven block it answers four
questions: where the component's hook is (:meth:`Component.address`: a module path, input or
output, and optionally operations inside that module's forward), how to view the hook's
value as ``[batch, tokens, (heads,) width]`` (:meth:`Component.view`), its width and heads,
and, on a tiny instance, whether the component means what its name says
(:meth:`Component.prove`, which refuses it with the reason when it does not).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["Address", "Component", "Context", "child", "first", "no_module", "walk", "with_first"]

MLP_READS = "mlp_reads"   # Block.stages key of the MLP module's own input (what a transcoder reads), not a component


def first(raw):
    """The tensor of a hook value: the first item of a tuple, else the value itself.

    >>> first((1, 2)), first(3)
    (1, 3)
    """
    return raw[0] if isinstance(raw, (tuple, list)) else raw


def with_first(raw, new):
    """``raw`` with its tensor (see :func:`first`) replaced by ``new``.

    >>> with_first((1, 2), 9), with_first(3, 9)
    ((9, 2), 9)
    """
    if isinstance(raw, list):   # (OpenAI GPT's blocks return lists)
        return [new] + raw[1:]
    return (new,) + tuple(raw[1:]) if isinstance(raw, tuple) else new


def child(root, name: str):
    """The submodule (or nnsight envoy) ``name`` of ``root``. An envoy serves a submodule
    named like one of its own values (BERT's ``output`` module) as ``E_output``.

    >>> import torch
    >>> child(torch.nn.Sequential(torch.nn.ReLU()), "0")
    ReLU()
    """
    if name.isdigit():
        return root[int(name)]
    prefix = getattr(type(root), "OVERLOAD_PREFIX", None)
    if prefix and not name.startswith("_") and inspect.isdatadescriptor(getattr(type(root), name, None)):
        name = prefix + name
    return getattr(root, name)


def walk(root, path: str):
    """The module (or nnsight envoy) at a dotted ``path`` below ``root``.

    >>> import torch
    >>> walk(torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU())), "0.0")
    ReLU()
    """
    for part in path.split("."):
        root = child(root, part)
    return root


def no_module(what: str, paths) -> str:
    """The refusal of a component whose module the block does not have.

    >>> from reftgraph.arch.tree import BlockPaths
    >>> no_module("MLP", BlockPaths(children=("attn", "ln_1")))
    'this block has no MLP (its modules: attn, ln_1)'
    """
    return f"this block has no {what} (its modules: {', '.join(paths.children)})"


@dataclass(frozen=True)
class Address:
    """Where a component lives in a block: a module path ('' = the block), its ``input`` or
    ``output``, and ``inner``: operations inside that module's forward (nnsight's ``.source``).

    >>> Address("self_attn", "output", ("attention_interface_1", "nn_functional_softmax_0")).inner[1]
    'nn_functional_softmax_0'

    ``inner`` names one operation per level, for a value that is no module's input or
    output (the attention probabilities); it is empty for the others.
    """

    path: Optional[str]
    io: str
    inner: tuple = ()
    root: bool = False      # True: ``path`` is from the model's root, not from the block (the stream's ends)

    def __repr__(self) -> str:
        root = ", root=True" if self.root else ""
        return f"Address(path={self.path!r}, io={self.io!r}, inner={self.inner!r}{root})"


@dataclass
class Context:
    """What the proofs of one block know, filled in as they run; components read it and
    add their refusals (``refused``) and findings (``layout``, ``inner``).

    >>> ctx = Context(model=None, blocks=None, layer=0, ids=None, paths=None, rec=None, heads=(4, 2), widths={})
    >>> ctx.refused, ctx.style_problem
    ({}, '')

    It holds the tiny model, its blocks, the recorded forward
    (:class:`~reftgraph.arch.styles.Record`), the module paths, heads and widths, and the
    block style (or why none holds).
    """

    model: object
    blocks: object
    layer: int
    ids: object
    paths: object
    rec: object
    heads: tuple
    widths: dict
    refused: dict = field(default_factory=dict)
    style: object = None
    attn_out: Optional[str] = None
    mlp_out: Optional[str] = None
    cross: Optional[str] = None       # what adds an encoder-decoder's cross-attention (decoder blocks)
    layout: Optional[str] = None
    inner: dict = field(default_factory=dict)   # component -> operations inside a module
    reads: dict = field(default_factory=dict)   # receiver input -> the norm its reader applies ('' none)
    mixer: Optional[str] = None       # the block's one sequence mixer, when it adds to the stream
    norms: dict = field(default_factory=dict)   # Post-LN: attn_out / mlp_out -> the norm after its addition
    scales: dict = field(default_factory=dict)  # scaled: attn_out / mlp_out -> (block attribute, value)
    beside: dict = field(default_factory=dict)  # mlp_out -> a module the block adds together with the MLP
    next_input: object = None         # the next block's input (None for the last block)
    style_problem: str = ""           # why no block style holds ('' when one does)


class Component:
    """One family of components (one module of :mod:`reftgraph.arch.components`).

    >>> from reftgraph.arch.components import component
    >>> component("head_out").names, component("head_out").has_heads
    (('head_out', 'q', 'k', 'v'), True)

    Subclasses set ``names`` (in forward order) and implement :meth:`address` and
    :meth:`prove`; :meth:`view`, :meth:`width` and :meth:`heads` default to a
    ``[batch, tokens, d_model]`` value without heads.
    """

    names: tuple = ()
    has_heads: bool = False
    needs_proof: bool = False   # True: its address is found by the proof (no hand-built Arch has it)

    def address(self, name: str, block) -> Address:
        """The hook of ``name`` in a proven ``block`` (or a :class:`Context` while proving).

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> component("mlp_act").address("mlp_act", rg.models.tiny("llama").arch.blocks[0])
        Address(path='mlp.down_proj', io='input', inner=())
        """
        raise NotImplementedError

    def view(self, name: str, arch, block, layer: int) -> tuple[Callable, Callable]:
        """``(get, put)``: ``get(raw, resid_pre)`` -> ``[B, S, (H,) w]``; ``put(raw, new,
        resid_pre)`` -> the raw hook value with the component replaced by ``new``.

        >>> import torch, reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> arch = rg.models.tiny("llama").arch
        >>> get, put = component("head_out").view("head_out", arch, arch.blocks[0], 0)
        >>> get(torch.zeros(1, 3, 32), None).shape
        torch.Size([1, 3, 4, 8])
        """
        return (lambda raw, pre: first(raw), lambda raw, new, pre: with_first(raw, new))

    def width(self, name: str, arch, block) -> Optional[int]:
        """The last-dim width on ``block`` (per head for head components), or None when the
        block does not say (then :meth:`fallback_width`).

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> arch = rg.models.tiny("llama").arch
        >>> component("mlp_act").width("mlp_act", arch, arch.blocks[0])
        48
        """
        return arch.d_model

    def fallback_width(self, name: str, arch) -> Optional[int]:
        """The width when no block says (a hand-built :class:`~reftgraph.arch.structure.Arch`).

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> component("q").fallback_width("q", rg.models.tiny("llama").arch)
        8
        """
        return arch.d_model

    def heads(self, name: str, arch, block) -> int:
        """How many heads the value has (0 without heads).

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> arch = rg.models.tiny("llama").arch
        >>> component("k").heads("k", arch, arch.blocks[0]), component("mlp_out").heads("mlp_out", arch, None)
        (2, 0)
        """
        return 0

    def modules(self, name: str, block) -> tuple:
        """Paths of the block's modules (None for none) that :meth:`view`'s ``put`` calls
        after ``(raw, new, pre)``: a receiver input recomputes its reader from them.

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> block = rg.models.tiny("llama").arch.blocks[0]
        >>> component("mlp_out").modules("mlp_out", block), component("q_in").modules("q_in", block)
        ((), ('input_layernorm', 'self_attn.q_proj'))
        """
        return ()

    def needs_pre(self, name: str, block) -> bool:
        """Whether :meth:`view` needs the block's input (``resid_pre``).

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> component("resid_mid").needs_pre("resid_mid", rg.models.tiny("llama").arch.blocks[0])
        True
        """
        return False

    def stage(self, name: str, ctx: "Context", stages: dict) -> Optional[float]:
        """Where the hook comes in the block's forward: ``stages`` maps the recorded
        ``(module path, "input" | "output")`` accesses to their order.

        >>> import reftgraph as rg
        >>> from reftgraph.arch.components import component
        >>> block = rg.models.tiny("llama").arch.blocks[0]
        >>> component("resid_pre").stage("resid_pre", block, {("", "input"): 0})
        0
        """
        where = self.address(name, ctx)
        return stages.get((where.path, where.io))

    def prove(self, ctx: Context) -> None:
        """Check what the components mean on the recorded tiny forward; refuse those that
        fail by setting ``ctx.refused[name]`` to the reason.

        >>> import reftgraph as rg
        >>> rg.models.tiny("gpt_neox").arch.blocks[0].refused["resid_mid"][:14]   # what a proof wrote
        'parallel block'
        """
        raise NotImplementedError
