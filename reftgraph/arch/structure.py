"""Canonical components -> a model's modules, found from its module tree and proven.

>>> import reftgraph as rg
>>> arch = rg.models.tiny("gpt_neox").arch
>>> arch.family.name, arch.blocks[0].style, arch.hook("mlp_out", 1)
('gpt_neox', 'parallel', Hook(layer=1, stage=..., path='mlp', io='output'))

:mod:`reftgraph.arch.tree` finds the candidate modules, :mod:`reftgraph.arch.proofs`
proves what each component means on a tiny instance, and :class:`Arch` serves the result
to the compiler: hooks, views, widths, and a clear refusal for any component that is not
proven on a layer. A user's :class:`Family` (registered for a ``model_type``) overrides
the module paths; the proofs still run on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from ..core.sites import COMPONENTS, STAGES
from ..errors import SiteError
from .components import component as component_of, first, with_first
from .components.base import MLP_READS, walk
from .positions import learned_limit, model_inputs
from .stacks import STACKS, is_seq2seq
from .tree import find_blocks

__all__ = ["Arch", "FAMILIES", "Family", "Hook", "Location", "family_for", "first", "register_family", "with_first"]

@dataclass(frozen=True)
class Family:
    """Module paths for one architecture, overriding what the resolver finds (any field left
    empty is found as usual). Register it for the ``model_type`` values it covers.

    >>> import reftgraph as rg
    >>> fam = rg.Family(name="mine", model_types=("my_model",), mlp="fc2", mlp_down="fc2")
    >>> fam.layers, fam.mlp
    ('', 'fc2')

    Paths are attribute paths: ``layers`` from the model root to the block list, the others
    from a block. ``qkv`` is three paths (separate projections) or one fused projection.
    """

    name: str
    model_types: tuple = ()
    layers: str = ""
    attn: str = ""
    mlp: str = ""
    attn_proj: str = ""
    mlp_down: str = ""
    qkv: Union[tuple, str] = ()
    qkv_layout: str = ""


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make a family known; its ``model_types`` are matched against ``config.model_type``.

    >>> from types import SimpleNamespace
    >>> mine = register_family(Family("mine", ("mine",), attn="self_attn"))
    >>> family_for(SimpleNamespace(model_type="mine")).name
    'mine'
    >>> del FAMILIES["mine"]    # (keep the registry as it was)
    """
    FAMILIES[family.name] = family
    return family


def family_for(config) -> Optional[Family]:
    """The user family registered for a config's ``model_type``, else None (later ones win).

    >>> from transformers import MistralConfig
    >>> family_for(MistralConfig()) is None
    True
    """
    model_type = getattr(config, "model_type", None)
    for family in reversed(list(FAMILIES.values())):
        if model_type in family.model_types:
            return family
    return None


@dataclass(frozen=True)
class Hook:
    """One access in a layer: module ``path`` ('' = the block), its ``input`` or ``output``
    (``io``), and ``inner``: operations inside that module's forward, one name per level
    (nnsight's ``.source``), for a value that is no module's input or output.

    >>> import reftgraph as rg
    >>> rg.models.tiny("gpt2").arch.hook("mlp_act", 1)     # the input of GPT-2's MLP down projection
    Hook(layer=1, stage=18, path='mlp.c_proj', io='input')
    """

    layer: int
    stage: float
    path: str
    io: str
    inner: tuple = ()
    root: bool = False     # ``path`` is from the model's root (embed, logits_in, logits), not from the block
    stack: str = ""        # an encoder-decoder's "encoder" or "decoder" ('' for a model with one stack)

    def __repr__(self) -> str:
        inner = f", inner={self.inner!r}" if self.inner else ""
        root = ", root=True" if self.root else ""
        stack = f", stack={self.stack!r}" if self.stack else ""
        return f"Hook(layer={self.layer}, stage={self.stage}, path={self.path!r}, io={self.io!r}{inner}{root}{stack})"

    @property
    def block(self) -> tuple:
        """The block the hook is in: ``(stack, layer)``.

        >>> Hook(2, 0, "", "input").block
        ('', 2)
        """
        return self.stack, self.layer

    @property
    def order(self) -> tuple:
        """Where the hook comes in the forward: an encoder's hooks before a decoder's, then by
        layer and stage.

        >>> Hook(0, 5, "", "output", stack="decoder").order > Hook(3, 0, "", "input", stack="encoder").order
        True
        """
        return self.stack != "encoder", self.layer, self.stage

    def at(self, path: str, io: str) -> "Hook":
        """A hook on another module of the same block (stage 0): ``path`` from the block.

        >>> Hook(1, 9, "mlp", "output").at("", "input")
        Hook(layer=1, stage=0, path='', io='input')
        """
        return Hook(self.layer, 0, path, io, stack=self.stack)


@dataclass(frozen=True)
class Location:
    """Where a component is at one layer and how to read it: see :meth:`Arch.locate`.

    >>> import reftgraph as rg
    >>> rg.models.tiny("gpt2").arch.locate("mlp_out", 0).hook.path
    'mlp'
    """

    hook: Hook
    get: Callable
    put: Callable
    width: int
    heads: int
    needs_pre: bool
    modules: tuple = ()   # block paths (None: none) that ``put`` calls after (raw, new, pre)


@dataclass
class Arch:
    """One model's architecture: dims, and per layer a proven :class:`~reftgraph.arch.proofs.Block`.

    >>> import reftgraph as rg
    >>> a = rg.models.tiny("llama").arch
    >>> a.family.name, a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.d_mlp
    ('llama', 2, 32, 4, 2, 8, 48)

    ``family`` gives the name (the config's ``model_type`` or a registered family's name)
    and the paths of the first block with attention; ``blocks`` holds what each layer has.
    """

    family: Family
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    blocks: tuple = field(default=(), repr=False)
    positions: str = "explicit"   # how the engine numbers positions (see reftgraph.arch.positions)
    padding: dict = field(default_factory=dict, repr=False)   # padding side -> why its proof failed
    max_tokens: Optional[int] = None   # the longest input learned position embeddings allow
    token_head: bool = True       # the model ends in per-token logits (False: a bare encoder, a sequence classifier)
    stack: str = ""               # an encoder-decoder's "encoder" or "decoder" ('' for one stack)
    stacks: dict = field(default_factory=dict, repr=False, compare=False)   # an encoder-decoder: name -> its Arch
    _located: dict = field(default_factory=dict, repr=False, compare=False)   # (component, layer) -> Location

    def inputs(self, input_ids, attention_mask) -> dict:
        """The model inputs for a padded batch: ids, mask, and position ids where the model takes them.

        >>> import torch, reftgraph as rg
        >>> sorted(rg.models.tiny("llama").arch.inputs(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)))
        ['attention_mask', 'input_ids', 'position_ids']
        """
        return model_inputs(self.positions, input_ids, attention_mask)

    @classmethod
    def of(cls, model, stack: Optional[str] = None) -> "Arch":
        """The architecture of a transformers model, found from its module tree and proven.

        >>> from transformers import GPT2LMHeadModel
        >>> from reftgraph.arch.models import tiny_config
        >>> Arch.of(GPT2LMHeadModel(tiny_config("gpt2"))).d_mlp
        48

        An encoder-decoder gives its decoder's Arch, with both stacks in ``stacks``
        (:mod:`reftgraph.arch.stacks`); ``stack`` names one.
        """
        from .proofs import prove

        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "named_modules"):
            raise SiteError(f"{type(model).__name__} is not a transformers model (no .config); wrap a "
                            "transformers causal LM, e.g. AutoModelForCausalLM.from_pretrained(...)")
        if stack is None and is_seq2seq(model):
            stacks = {name: cls.of(model, name) for name in STACKS}
            for arch in stacks.values():
                arch.stacks = stacks
            return stacks["decoder"]
        user = family_for(config)
        if stack:
            kind = getattr(config, "model_type", type(model).__name__)
            user = dataclasses.replace(user or Family(kind, (kind,)), layers=find_blocks(model, stack)[0])
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        d_model = getattr(config, "hidden_size", None) or getattr(embed, "embedding_dim", None)
        layers, blocks, (positions, padding) = prove(model, d_model, user)
        if stack == "encoder":   # the logits are the decoder's
            why = "an encoder-decoder's logits are read from its decoder: use stack='decoder' (the default)"
            blocks = [dataclasses.replace(b, refused={**b.refused, "logits": why, "logits_in": why}) for b in blocks]
        first_attn = next((b for b in blocks if b.paths.attn), blocks[0])
        p = first_attn.paths
        family = Family(user.name if user else getattr(config, "model_type", type(model).__name__),
                        (getattr(config, "model_type", ""),), layers, p.attn or "", p.mlp or "",
                        p.attn_proj or "", p.mlp_down or "", p.qkv or (), first_attn.qkv_layout or "")
        nq, nkv = first_attn.heads
        w = first_attn.widths
        d_mlp = next((b.widths["mlp_act"] for b in blocks if "mlp_act" in b.widths), 0)
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        return cls(family, len(blocks), d_model, nq, nkv, w.get("head_out", 0), d_mlp, tuple(blocks), positions,
                   padding, learned_limit(model, positions), head is not None, stack or "")

    # -- what exists where ---------------------------------------------------
    def refusal(self, component: str, layer: int) -> Optional[str]:
        """Why ``component`` cannot be used at ``layer`` (non-negative), or None when it can.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("gpt_neox").arch     # parallel attention and MLP
        >>> arch.refusal("resid_mid", 0)[:15], arch.refusal("attn_out", 0)
        ('gpt_neox refuse', None)
        """
        if not self.blocks:
            return (f"{component} is found by the proofs, and this architecture was built by hand without them"
                    if component_of(component).needs_proof else None)
        why = self.blocks[layer].refused.get(component)
        if why is None:
            return None
        where = [i for i, b in enumerate(self.blocks) if component not in b.refused]
        there = f"; it exists on layers {_ranges(where)}" if where else ""
        hint = ""
        missed = ("found" in why or "has no" in why) and "cross-attention" not in why
        if missed:   # the resolver may have missed a module: say how to name it
            hint = (f". If the module exists under another name, register it: rg.register_family(rg.Family("
                    f"name='mine', model_types=({self.family.model_types[0]!r},), attn='self_attn', mlp='mlp', "
                    "attn_proj='self_attn.o_proj', mlp_down='mlp.down_proj', qkv=('self_attn.q_proj', "
                    "'self_attn.k_proj', 'self_attn.v_proj'))) with your paths")
        return f"{self.family.name} refuses {component} at layer {layer}: {why}{there}{hint}"

    def check(self, component: str, layer: int) -> None:
        """Raise :class:`SiteError` when ``component`` is refused at ``layer``.

        >>> import reftgraph as rg
        >>> rg.models.tiny("gpt2").arch.check("q", 1)     # proven: no error
        """
        why = self.refusal(component, layer)
        if why:
            raise SiteError(why)

    def table(self) -> dict:
        """``{component: "verified" | reason}`` for every component, over all layers.

        >>> import reftgraph as rg
        >>> rg.models.tiny("llama").arch.table()["head_out"]
        'verified'

        :meth:`summary` gives the same as a DataFrame, one row per component and layer range.
        """
        out = {}
        for c in COMPONENTS:
            reasons = [self.refusal(c, i) for i in range(self.n_layers)]
            bad = [r for r in reasons if r]
            out[c] = "verified" if not bad else bad[0] if len(bad) == len(reasons) else \
                f"on layers {_ranges([i for i, r in enumerate(reasons) if not r])} only"
        return out

    def summary(self):
        """A pandas DataFrame of what each component is on which layers: one row per component
        and range of layers with the same status, ``"verified"`` or why it is refused.

        >>> import reftgraph as rg
        >>> table = rg.models.tiny("gpt_neox").arch.summary()      # parallel attention and MLP
        >>> print(table.head(3).to_string(index=False, max_colwidth=40))
         component layers                                   status
         resid_pre    0-1                                 verified
         resid_mid    0-1 parallel block: attention and MLP bot...
        resid_post    0-1                                 verified

        :meth:`table` gives ``{component: status}`` over all layers.
        """
        import pandas as pd

        rows = []
        for c in COMPONENTS:
            status = [(self.blocks[i].refused.get(c) if self.blocks else None) or "verified"
                      for i in range(self.n_layers)]
            start = 0
            for i in range(1, self.n_layers + 1):
                if i == self.n_layers or status[i] != status[start]:
                    rows.append((c, _ranges(list(range(start, i))), status[start]))
                    start = i
        return pd.DataFrame(rows, columns=["component", "layers", "status"])

    # -- dims --------------------------------------------------------------
    def heads(self, component: str, layer: Optional[int] = None) -> int:
        """How many heads ``component`` has: key-value heads for ``k`` and ``v`` (0 without heads).

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch     # grouped-query: 4 query heads, 2 key-value heads
        >>> arch.heads("q"), arch.heads("k"), arch.heads("head_out")
        (4, 2, 4)
        """
        block = self.blocks[layer] if layer is not None and self.blocks else None
        return component_of(component).heads(component, self, block)

    def width(self, component: str, layer: Optional[int] = None) -> int:
        """The last-dim width of ``component``: per head for head components.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch
        >>> arch.width("resid_post"), arch.width("mlp_act"), arch.width("head_out")
        (32, 48, 8)
        """
        kind = component_of(component)
        blocks = [self.blocks[layer]] if layer is not None and self.blocks else self.blocks
        for b in blocks:
            width = kind.width(component, self, b)
            if width:
                return width
        return kind.fallback_width(component, self)

    def layer_index(self, layer: int) -> Optional[int]:
        """Non-negative layer index, or None when out of range.

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch     # 2 layers
        >>> arch.layer_index(-1), arch.layer_index(2)
        (1, None)
        """
        resolved = layer + self.n_layers if layer < 0 else layer
        return resolved if 0 <= resolved < self.n_layers else None

    def needs_pre(self, component: str, layer: int) -> bool:
        """Whether ``component``'s view needs the block input (``resid_mid``, flattened tokens).

        >>> import reftgraph as rg
        >>> arch = rg.models.tiny("llama").arch
        >>> arch.needs_pre("resid_mid", 0), arch.needs_pre("mlp_out", 0)
        (True, False)
        """
        return component_of(component).needs_pre(component, self._block(layer))

    # -- modules -----------------------------------------------------------
    def _block(self, layer: int):
        from .proofs import Block
        from .tree import BlockPaths

        if self.blocks:
            return self.blocks[layer]
        f = self.family   # a hand-built Arch: the family's paths, sequential
        return Block(BlockPaths(f.attn, f.attn_proj, f.qkv, f.mlp, f.mlp_down), "sequential", f.attn, f.mlp,
                     f.qkv_layout or "separate", (self.n_heads, self.n_kv_heads))

    def locate(self, component: str, layer: int) -> "Location":
        """Everything the compiler needs of ``component`` at ``layer`` (non-negative), in one
        call: its hook, view, width, heads and whether the view needs the block's input.
        Refused components raise :class:`SiteError` with the reason. Cached per (component, layer).

        >>> import reftgraph as rg
        >>> where = rg.models.tiny("llama").arch.locate("k", 1)
        >>> where.hook.path, where.heads, where.width, where.needs_pre
        ('self_attn.k_proj', 2, 8, False)
        """
        key = (component, layer)
        if key not in self._located:
            get, put = self.view(component, layer)
            kind = component_of(component)
            self._located[key] = Location(self.hook(component, layer), get, put, self.width(component, layer),
                                          self.heads(component, layer), self.needs_pre(component, layer),
                                          kind.modules(component, self._block(layer)))
        return self._located[key]

    def hook(self, component: str, layer: int) -> Hook:
        """Which module, input or output, holds ``component`` at ``layer`` (non-negative).

        >>> import reftgraph as rg
        >>> rg.models.tiny("llama").arch.hook("head_out", 0)
        Hook(layer=0, stage=..., path='self_attn.o_proj', io='input')
        """
        b = self._block(layer)
        self.check(component, layer)
        where = component_of(component).address(component, b)
        return Hook(layer, b.stages.get(component, STAGES[component]), where.path, where.io, where.inner, where.root,
                    self.stack)

    def mlp_input(self, layer: int) -> Optional[Hook]:
        """Where a transcoder reads at ``layer`` (non-negative): the input of the block's MLP
        module, what the MLP itself computes from (after its norm in pre-norm blocks); None
        when the block has no such per-token input.

        >>> import reftgraph as rg
        >>> rg.models.tiny("llama").arch.mlp_input(0).path
        'mlp'
        """
        b = self._block(layer)
        stage = b.stages.get(MLP_READS)
        return None if stage is None else Hook(layer, stage, b.paths.mlp, "input", stack=self.stack)

    def envoy(self, root, hook: Hook):
        """The nnsight envoy (or torch module) of a hook, from the model root; for a hook with
        ``inner`` operations, the envoy of the innermost one (inside a trace only).

        >>> import reftgraph as rg
        >>> lm = rg.models.tiny("llama")
        >>> lm.arch.envoy(lm.hf, lm.arch.hook("mlp_out", 1)) is lm.hf.model.layers[1].mlp
        True
        """
        if hook.stack and hook.stack != self.stack:
            return self.stacks[hook.stack].envoy(root, hook)
        module = root
        path = hook.path if hook.root else f"{self.family.layers}.{hook.layer}" + (f".{hook.path}" if hook.path else "")
        module = walk(module, path)
        for name in hook.inner:
            module = getattr(module.source, name)
        return module

    def view(self, component: str, layer: int = 0) -> tuple[Callable, Callable]:
        """``(get, put)``: ``get(raw, resid_pre)`` -> ``[B, S, width]`` or ``[B, S, H, Dh]``;
        ``put(raw, new, resid_pre)`` -> the raw hook value with the component replaced.

        >>> import torch, reftgraph as rg
        >>> get, put = rg.models.tiny("gpt2").arch.view("k")   # k inside GPT-2's fused [q | k | v]
        >>> raw = torch.randn(1, 3, 96)
        >>> get(raw, None).shape, torch.equal(put(raw, get(raw, None), None), raw)
        (torch.Size([1, 3, 4, 8]), True)
        """
        return component_of(component).view(component, self, self._block(layer), layer)


def _ranges(layers: list) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
