"""A dictionary of features (a sparse autoencoder or transcoder) as an op and as a basis.

>>> import torch, reftgraph as rg
>>> sae = rg.Dictionary(d_in=32, d_sae=128, activation="topk", k=8, seed=0)
>>> f = sae.encode(torch.randn(2, 3, 32))
>>> f.shape, int((f != 0).sum(-1).max())
(torch.Size([2, 3, 128]), 8)

As a node's op it splices its reconstruction in (``decode(encode(h))``); given as
``basis=`` to ``Patch``, ``Add``, ``Set``, ``Ablate`` or ``Collect``, that op acts on
feature activations instead, the node's ``subspace`` naming feature ids, and the
reconstruction error is kept: ``h' = h + (f'_ids - f_ids) @ W_dec[ids] / scale``. An edit
that leaves the features as they are leaves ``h`` exactly as it is.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Op, positive_int

ACTIVATIONS = ("relu", "jumprelu", "topk")
READS = ("", "mlp")   # where the encoder reads: the node's own site, or the MLP's input (a transcoder)


class Dictionary(Op):
    """A sparse dictionary of features: ``encode`` gives their activations, ``decode`` the reconstruction.

    >>> import torch, reftgraph as rg
    >>> sae = rg.Dictionary(d_in=4, d_sae=8, activation="relu", seed=0)
    >>> x = torch.randn(1, 2, 4)
    >>> torch.allclose(sae(x), sae.decode(sae.encode(x)))       # as an op: the reconstruction
    True

    ``f = act((scale * x - b_dec?) @ W_enc + b_enc)`` and ``x_hat = (f @ W_dec + b_dec) / scale``.
    ``activation``: ``"relu"``; ``"jumprelu"`` (``pre * (pre > threshold)``, a threshold per
    feature); ``"topk"`` (the ``k`` largest pre-activations of each token, ReLU'd). BatchTopK
    dictionaries run as JumpReLU with the threshold they were trained to (as their trainers
    run them at inference). ``apply_b_dec_to_input`` subtracts ``b_dec`` before encoding.
    ``scale`` multiplies the input before encoding and divides the reconstruction (the
    input normalisation some trainers fold in). ``d_out`` (a transcoder's output width)
    defaults to ``d_in``. ``name``, ``model`` and ``trained_at`` (a site such as
    ``"resid_post[15]"``) describe where it was trained: a graph refuses a node at another
    site unless ``strict=False``. ``reads="mlp"`` makes it a transcoder: its encoder reads the
    input of the block's MLP (what the MLP itself computes from, after its norm in pre-norm
    blocks), its decoder writes at ``mlp_out`` (the node's site), and an edit keeps the
    replacement's error: ``mlp_out' = mlp_out + (f' - f) @ W_dec``. Weights are buffers (a dictionary is not trained with the
    graph); a seeded random dictionary (decoder rows of norm 1, encoder its transpose) is
    what tests use. :func:`reftgraph.features.load` reads trained ones.
    """

    def __init__(self, d_in: int, d_sae: int, activation: str = "relu", k: Optional[int] = None,
                 d_out: Optional[int] = None, apply_b_dec_to_input: bool = False, scale: float = 1.0,
                 name: str = "", model: str = "", trained_at: str = "", strict: bool = True, seed: int = 0,
                 reads: str = ""):
        super().__init__()
        self.reads = reads
        self.d_in = positive_int("Dictionary", "d_in", d_in)
        self.d_sae = positive_int("Dictionary", "d_sae", d_sae)
        self.d_out = self.d_in if d_out is None else positive_int("Dictionary", "d_out", d_out)
        self.activation, self.k = activation, k
        self.apply_b_dec_to_input, self.scale = bool(apply_b_dec_to_input), float(scale)
        self.name, self.model, self.trained_at, self.strict, self.seed = name, model, trained_at, bool(strict), seed
        problem = self.check_config()
        if problem:
            raise ValueError(f"Dictionary: {problem}")
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(self.d_sae, self.d_out, generator=g)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        w_enc = w_dec.T.clone() if self.d_out == self.d_in else torch.randn(self.d_in, self.d_sae, generator=g)
        self.register_buffer("W_enc", w_enc)
        self.register_buffer("b_enc", -0.1 * torch.rand(self.d_sae, generator=g))
        self.register_buffer("W_dec", w_dec)
        self.register_buffer("b_dec", 0.1 * torch.randn(self.d_out, generator=g))
        if activation == "jumprelu":
            self.register_buffer("threshold", 0.2 * torch.rand(self.d_sae, generator=g))
        else:
            self.threshold = None

    def config(self) -> dict:
        return {"d_in": self.d_in, "d_sae": self.d_sae, "activation": self.activation, "k": self.k,
                "d_out": None if self.d_out == self.d_in else self.d_out,
                "apply_b_dec_to_input": self.apply_b_dec_to_input, "scale": self.scale, "name": self.name,
                "model": self.model, "trained_at": self.trained_at, "strict": self.strict, "seed": self.seed,
                **({"reads": self.reads} if self.reads else {})}

    def check_config(self) -> Optional[str]:
        if self.activation not in ACTIVATIONS:
            return f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"
        if self.activation == "topk" and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                          or not 1 <= self.k <= self.d_sae):
            return f"a topk dictionary needs k in 1..{self.d_sae} (d_sae), got {self.k!r}"
        if not self.scale > 0:
            return f"scale must be > 0, got {self.scale!r}"
        if self.reads not in READS:
            return f"reads must be one of {READS} ('mlp': a transcoder, reading the MLP's input), got {self.reads!r}"
        if self.reads and self.apply_b_dec_to_input:
            return "a transcoder's b_dec is on its output side: apply_b_dec_to_input must be False"
        if not self.reads and self.d_out != self.d_in:
            return f"d_out {self.d_out} differs from d_in {self.d_in}: that is a transcoder (reads='mlp')"
        return None

    def expected_width(self) -> int:
        return self.d_in

    @property
    def label(self) -> str:
        """How messages name the dictionary.

        >>> Dictionary(4, 8, name="res15").label, Dictionary(4, 8).label
        ("dictionary 'res15'", 'the dictionary')
        """
        return f"dictionary {self.name!r}" if self.name else "the dictionary"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of inputs ``[..., d_in]`` (in the dictionary's dtype).

        >>> sae = Dictionary(4, 8, activation="jumprelu", seed=1)
        >>> f = sae.encode(torch.randn(5, 4))
        >>> bool(((f == 0) | (f > sae.threshold)).all())
        True
        """
        x = x.to(self.W_enc.dtype) * self.scale
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[..., d_out]`` of feature activations ``[..., d_sae]``.

        >>> sae = Dictionary(4, 8, seed=0)
        >>> torch.allclose(sae.decode(torch.zeros(8)), sae.b_dec)
        True
        """
        return (f @ self.W_dec + self.b_dec) / self.scale

    def directions(self, ids=None) -> torch.Tensor:
        """What one unit of each feature adds to the activation: rows of ``W_dec / scale``
        (``[len(ids), d_out]``; all features when ``ids`` is None).

        >>> Dictionary(4, 8, scale=2.0).directions([0, 1]).norm(dim=-1).round(decimals=4).tolist()
        [0.5, 0.5]
        """
        w = self.W_dec if ids is None else self.W_dec[list(ids)]
        return w / self.scale

    def forward(self, h, source=None, valid=None, inputs=None):
        return self.decode(self.encode(h if inputs is None else inputs)).to(h.dtype)

    def around(self, op: Op, h: torch.Tensor, source=None, valid=None, subspace=None, rows=None,
               inputs=None, source_inputs=None) -> torch.Tensor:
        """``op``'s edit of ``h`` made in feature space, written back along the decoder directions.

        >>> import reftgraph as rg
        >>> sae = Dictionary(4, 8, seed=0)
        >>> h = torch.randn(1, 2, 4)
        >>> torch.equal(sae.around(rg.Add(torch.zeros(2)), h, subspace=(0, 3)), h)
        True

        ``op`` sees the activations of features ``subspace`` (all when None); a collecting
        op records them. An op with ``error=True`` (``Patch``) also swaps the reconstruction
        error ``h - decode(encode(h))`` for the source's; with ``features=False`` it leaves
        the features as they are. A transcoder encodes ``inputs`` (and the source's
        ``source_inputs``), what the MLP reads, and its error is ``h - decode(f)``.
        """
        ids = None if subspace is None else torch.tensor(subspace, device=h.device)
        full = self.encode(h if inputs is None else inputs)   # a transcoder encodes what the MLP reads
        f = full if ids is None else full.index_select(-1, ids)
        full_source = None if source is None else self.encode(source if source_inputs is None else source_inputs)
        if not getattr(op, "features", True):
            new = f
        else:
            src = full_source if full_source is None or ids is None else full_source.index_select(-1, ids)
            new = op.forward_with(f, source=src, valid=valid, rows=rows)
        if op.collects:
            return new
        w = self.W_dec if ids is None else self.W_dec.index_select(0, ids)
        out = h + (((new - f) @ w) / self.scale).to(h.dtype)
        if getattr(op, "error", False):   # the source's reconstruction error replaces the slice's own
            out = out + ((source - self.decode(full_source)) - (h - self.decode(full))).to(h.dtype)
        return out
