"""Property tests (hypothesis): random graphs - components, layers, positions, heads,
subspaces, ops and streams - on tiny Llama, GPT-2 and GPT-NeoX models compile, and their run
equals the plain-hook oracle (logits, collected values and gradients); save -> load -> run is
bit-exact.

The oracle applies the nodes as plain PyTorch hooks in forward order (layer, then place in
the block, then insertion order), one run per stream: the source stream first with its own
nodes, recording what each patch reads, then the base stream."""

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reftgraph as rg
from reftgraph.core.sites import KEY_COMPONENTS
from oracle import encode, install, positions_of, real_positions
from reftgraph.arch import STAGES
from reftgraph.core.ops.rotate import Rotate
from test_oracle import REFT, oracle_edit

FAMILIES = ("llama", "gpt2", "gpt_neox")
BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]  # the same lengths as BASE, row by row
SELECTORS = ([0], [-2, 1], "last", "f2+l2", "f0+l3", slice(1, None, 2), slice(0, 3), "all")
EQUAL_COUNTS = ([0], [-2, 1], "last", "f2+l2", "f0+l3", slice(0, 3))  # the same count in every row
KINDS = ("add", "set", "zero", "mean", "resample", "collect", "patch", "rotate") + REFT
ATOL = 1e-5
SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return rg.models.tiny(request.param)


@st.composite
def nodes(draw, arch):
    """(site, op, stream, kind) of one random node."""
    component = draw(st.sampled_from([c for c in rg.COMPONENTS if arch.table()[c] == "verified"
                                      and c not in KEY_COMPONENTS]))   # attn_pattern: test_pattern.py
    kind = draw(st.sampled_from(KINDS))
    positions = draw(st.sampled_from(EQUAL_COUNTS if kind == "resample" else SELECTORS))
    head = None
    if component in ("head_out", "q", "k", "v"):
        n = arch.heads(component)
        head = draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(tuple))
    width = arch.width(component)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    learned = kind in REFT or kind == "rotate"
    dims = range(4) if learned else range(width)
    subspace = draw(st.none() | st.lists(st.sampled_from(dims), min_size=1, max_size=3, unique=True).map(tuple))
    op_width = len(subspace) if subspace and not learned else width
    if kind in REFT:
        op = getattr(rg, kind)(width=width, rank=4, act="tanh" if "Di" in kind else "identity", seed=seed)
        with torch.no_grad():
            op.bias.normal_(generator=g)
    elif kind == "rotate":
        op = Rotate(width=width, k=draw(st.integers(1, 4)), rank=4, seed=seed)
    elif kind == "patch":
        op = rg.Patch("source")
    elif kind == "add":
        op = rg.Add(torch.randn(op_width, generator=g), scale=1.5, trainable=draw(st.booleans()))
    elif kind == "set":
        op = rg.Set(torch.randn(op_width, generator=g), trainable=draw(st.booleans()))
    elif kind == "collect":
        op = rg.Collect()
    else:
        op = rg.Ablate(kind, seed=seed)
    stream = "base" if kind in ("patch", "rotate") or draw(st.booleans()) else "source"
    layer = draw(st.sampled_from([0, 1, -1, -2]))
    return rg.Site(component, layer=layer, positions=positions, head=head, subspace=subspace), op, stream, kind


@st.composite
def graphs(draw, arch):
    g, kinds = rg.Graph(), {}
    for i in range(draw(st.integers(1, 4))):
        site, op, stream, kind = draw(nodes(arch))
        kinds[g.add(site, op, name=f"n{i}", stream=stream)] = kind
    return g, kinds


def forward_order(g: rg.Graph, lm) -> list:
    """Nodes in the order the model reaches them (in a fused q/k/v projection: q_in, q, k_in,
    k, v_in, v, each head input before what its reader computes from it)."""
    def key(item):
        i, node = item
        return node.site.layer % lm.arch.n_layers, STAGES[node.site.component], i

    return [node for _, node in sorted(enumerate(g.nodes), key=key)]


def rotate_edit(op, site, mask, src_tensor, src_mask):
    """Rotate: h + R^T (R s - R h) on the selected slots, built from the oracle's patch edit."""
    patch = oracle_edit("patch", op, site.replace(subspace=None), mask, src_tensor, src_mask)
    rt = op.Rt(op.dims(site.subspace))
    return lambda t: t + ((patch(t) - t) @ rt) @ rt.T


def oracle(lm, g, kinds, side):
    """Per stream: logits and the collected values, with the graph's nodes as plain hooks."""
    family, cfg = lm.arch.family.name, lm.hf.config
    inputs = {"source": encode(lm.tokenizer, SOURCE, side), "base": encode(lm.tokenizer, BASE, side)}
    read, logits, collected = {}, {}, {}
    for stream in ("source", "base"):
        mask = inputs[stream]["attention_mask"]
        handles = []

        def keep(store, name):
            def fn(t):
                store[name] = t.detach().clone() if store is collected else t
                return t
            return fn

        for node in forward_order(g, lm):
            kind, layer = kinds[node.name], node.site.layer % lm.arch.n_layers
            if stream == "source" and kind in ("patch", "rotate"):
                edit = keep(read, node.name)  # what the patch reads, after earlier source edits
            elif node.stream != stream:
                continue
            elif kind == "collect":
                edit = keep(collected, node.name)
            elif kind == "rotate":
                edit = rotate_edit(node.op, node.site, mask, read[node.name], inputs["source"]["attention_mask"])
            else:
                edit = oracle_edit(kind, node.op, node.site, mask, read.get(node.name),
                                   inputs["source"]["attention_mask"])
            handles += install(lm.hf, family, node.site.component, layer, edit, cfg)
        try:
            logits[stream] = lm.hf(**inputs[stream]).logits
        finally:
            for h in handles:
                h.remove()
    return inputs, logits, collected


def loss(logits, mask):
    weights = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(1))
    return sum((logits[b, r] * weights).sum() for b, r in enumerate(real_positions(mask)))


def check_against_oracle(lm, g, kinds, side):
    out = g.run(lm, BASE, sources={"source": SOURCE} if "source" in g.streams else None, padding_side=side,
                grad=True)
    params = [p for p in g.parameters() if p.requires_grad]
    base_mask = out.attention_mask[out.rows["base"]]
    ours_grad = torch.autograd.grad(loss(out.logits, base_mask), params, allow_unused=True) if params else ()
    inputs, ref, collected = oracle(lm, g, kinds, side)
    ref_mask = inputs["base"]["attention_mask"]
    for b, (ours, theirs) in enumerate(zip(real_positions(base_mask), real_positions(ref_mask))):
        torch.testing.assert_close(out.logits[b, ours], ref["base"][b, theirs], atol=ATOL, rtol=0)
    if params:
        ref_loss = loss(ref["base"], ref_mask)  # no gradient at all when only source nodes are trainable
        ref_grad = (torch.autograd.grad(ref_loss, params, allow_unused=True) if ref_loss.requires_grad
                    else [None] * len(params))
        for a, b in zip(ours_grad, ref_grad):
            if a is None or b is None:
                assert a is None or not a.any(), "a gradient only reftgraph sees"
                assert b is None or not b.any(), "a gradient only the oracle sees"
            else:
                torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    for name, full in collected.items():
        node, mask = g[name], inputs[g[name].stream]["attention_mask"]
        for b, real in enumerate(real_positions(mask)):
            rel = positions_of(node.site.positions, len(real))
            want = full[b, [real[r] for r in rel]]
            if node.site.head is not None:
                want = want[:, list(node.site.head)]
            if node.site.subspace is not None:
                want = want[..., list(node.site.subspace)]
            assert out.valid[name][b].sum() == len(rel)
            torch.testing.assert_close(out[name][b, :len(rel)], want, atol=ATOL, rtol=0)
    return out


@given(data=st.data())
@SETTINGS
def test_random_graphs_equal_the_oracle_and_round_trip(lm, data):
    g, kinds = data.draw(graphs(lm.arch), label="graph")
    side = data.draw(st.sampled_from(["left", "right"]), label="padding side")
    out = check_against_oracle(lm, g, kinds, side)

    with tempfile.TemporaryDirectory() as folder:
        rg.save(g, f"{folder}/g", model=lm)
        g2 = rg.load_graph(f"{folder}/g", model=lm)
    assert [str(n) for n in g2.nodes] == [str(n) for n in g.nodes] and list(g2.edges) == list(g.edges)
    sources = {"source": SOURCE} if "source" in g.streams else None
    out, out2 = (graph.run(lm, BASE, sources=sources, padding_side=side, grad=False) for graph in (g, g2))
    assert torch.equal(out.logits, out2.logits)
    assert out.collected.keys() == out2.collected.keys()
    assert all(torch.equal(out[k], out2[k]) for k in out.collected)
