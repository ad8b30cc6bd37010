"""Subspace effects, projections and principal angles on a tiny model with planted directions."""

import pandas as pd
import pytest
import torch

import reftgraph as rg
from reftgraph import subspace
from reftgraph.core.ops import Rotate

PROMPTS = ["the cat sat on it", "a dog", "hello there", "abc"]
TARGET = 42  # the token whose logit the planted direction raises


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def planted_basis(lm, planted=2, rank=4):
    """Orthonormal rows; row ``planted`` is the unembedding direction of TARGET (through the
    final norm's gain), the others random and orthogonal to it."""
    u = lm.hf.lm_head.weight[TARGET] * lm.hf.model.norm.weight
    rows = torch.randn(rank, u.shape[0], generator=torch.Generator().manual_seed(0))
    rows[planted] = u
    order = [planted] + [i for i in range(rank) if i != planted]
    q = subspace.orthonormal_rows(rows[order])
    out = torch.empty_like(q)
    out[order] = q
    return out.detach()


def planted_graph(lm, planted=2):
    """LoBiReFT ``h + R^T b`` with b non-zero only on the planted dim."""
    op = rg.LoBiReFT(width=32, rank=4, seed=0)
    with torch.no_grad():
        op.rotate.copy_(planted_basis(lm, planted).T)
        op.bias.zero_()
        op.bias[planted] = 3.0
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), op, name="r")
    return g


def target_logit(logits):
    return logits[:, TARGET]


@pytest.mark.parametrize("planted", [0, 2])
def test_planted_dim_comes_out_on_top(lm, planted):
    table = subspace.effects(planted_graph(lm, planted), "r", lm, PROMPTS, target_logit)
    assert list(table.columns) == ["node", "mode", "dims", "metric", "reference", "effect"]
    assert table["dims"].tolist() == ["0", "1", "2", "3", "0,1,2,3"] * 2
    for mode in ("ablate", "steer"):
        single = table[(table["mode"] == mode) & ~table["dims"].str.contains(",")]
        top = single.loc[single["effect"].abs().idxmax()]
        assert top["dims"] == str(planted), single
        others = single[single["dims"] != str(planted)]["effect"].abs().max()
        assert abs(top["effect"]) > 3 * others
    ablate = table[table["mode"] == "ablate"].set_index("dims")["effect"]
    # the planted edit lives on one dim: ablating another changes nothing, ablating it undoes the edit
    assert ablate.drop([str(planted), "0,1,2,3"]).abs().max() < 1e-5
    assert ablate[str(planted)] < 0 and ablate[str(planted)] == pytest.approx(ablate["0,1,2,3"], abs=1e-5)
    steer = table[table["mode"] == "steer"].set_index("dims")["effect"]
    assert steer[str(planted)] > 0


def test_ablating_a_dim_equals_dropping_it_from_the_subspace(lm):
    """For a Rotate node, removing dim i's part of the edit = interchanging the other dims only."""
    op = Rotate(width=32, k=3, seed=1)
    sources = {"source": ["my hat was on top", "a cow", "bye now", "xyz"]}
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="f1+l1"), op, name="das")
    table = subspace.effects(g, "das", lm, PROMPTS, target_logit, sources=sources, modes=("ablate",),
                             groups=[(1,), (0, 2)])
    for dims, rest in (("1", (0, 2)), ("0,2", (1,))):
        h = rg.Graph()
        h.add(rg.Site("resid_post", layer=0, positions="f1+l1", subspace=rest), op, name="das")
        want = h.run(lm, PROMPTS, sources=sources, grad=False).next_token_logits[:, TARGET].mean()
        got = table.set_index("dims").loc[dims, "metric"]
        assert got == pytest.approx(float(want), abs=1e-5)
    assert (table["effect"].abs() > 1e-4).all()


def test_neuron_basis_and_bad_dims(lm):
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=0, positions="last", subspace=(3, 5)), rg.Patch("source"), name="p")
    table = subspace.effects(g, "p", lm, PROMPTS[:2], target_logit, sources={"source": ["xy zw", "cd"]},
                             modes=("steer",), scale=2.0)
    assert table["dims"].tolist() == ["3", "5", "3,5"]
    with pytest.raises(ValueError, match=r"node 'p' .*dim 4 is not in its subspace \[3, 5\]"):
        subspace.effects(g, "p", lm, PROMPTS[:2], target_logit, groups=[(4,)])


def test_projection_separates_a_planted_label(lm):
    """At the embeddings, prompts ending in 'a' vs 'b' project apart on E[a] - E[b]."""
    emb = lm.hf.model.embed_tokens.weight
    ids = [lm.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ab"]
    direction = emb[ids[0]] - emb[ids[1]]
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Add(direction.detach()), name="v")
    prompts = ["xya", "qqb", "a", "zzzzb", "ba", "ab"]
    labels = [p[-1] for p in prompts]
    table = subspace.project(g, "v", lm, prompts, labels)
    assert list(table.columns) == ["row", "slot", "label", "d0"] and len(table) == 6
    lo_a = table[table["label"] == "a"]["d0"].min()
    hi_b = table[table["label"] == "b"]["d0"].max()
    assert lo_a > hi_b
    u = direction / direction.norm()
    torch.testing.assert_close(torch.tensor(table["d0"].tolist()),
                               torch.stack([emb[ids[0] if p.endswith("a") else ids[1]] @ u for p in prompts]),
                               atol=1e-5, rtol=0)
    fig = subspace.plot_projection(table)
    assert len(fig.axes[0].collections) == 2


def test_projection_of_head_sites_has_a_head_column(lm):
    g = rg.Graph()
    g.add(rg.Site("head_out", layer=1, head=(0, 2), positions="f1+l1"), rg.LoReFT(width=8, rank=2), name="h")
    table = subspace.project(g, "h", lm, PROMPTS[:2], labels=["x", "y"])
    assert list(table.columns) == ["row", "slot", "head", "label", "d0", "d1"]
    assert len(table) == 2 * 2 * 2 and set(table["head"]) == {0, 2}


def test_principal_angles_and_overlap(lm):
    op = rg.LoReFT(width=32, rank=8, seed=0)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last", subspace=(0, 1, 2, 3)), op, name="a")
    g.add(rg.Site("resid_post", layer=1, positions="last", subspace=(2, 3, 4)), op, name="b")
    g.add(rg.Site("resid_post", layer=1, positions="last", subspace=(4, 5, 6, 7)), op, name="c")
    angles = subspace.principal_angles(g["a"], g["b"])
    assert angles["degrees"].tolist() == pytest.approx([0.0, 0.0, 90.0], abs=0.1)  # arccos near 1: ~0.02
    assert angles["cosine"].tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    assert subspace.overlap(g["a"], g["b"]) == pytest.approx(2 / 3)
    assert subspace.overlap(g["a"], g["c"]) == pytest.approx(0.0, abs=1e-10)
    # neuron dims of a Patch node are placed in the full width
    p = rg.Graph()
    p.add(rg.Site("resid_post", layer=1, positions="last", subspace=(3, 9)), rg.Patch("source"), name="p")
    e = torch.zeros(1, 32)
    e[0, 9] = 1.0
    assert subspace.overlap(p["p"], e, model=lm) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pass model="):
        subspace.overlap(p["p"], e)
    with pytest.raises(ValueError, match="different widths"):
        subspace.overlap(g["a"], torch.eye(8)[:2])


def test_plot_effects(lm):
    g = planted_graph(lm)
    table = subspace.effects(g, "r", lm, PROMPTS[:2], target_logit)
    fig = subspace.plot_effects(table)
    assert len(fig.axes[0].patches) == 2 * 5
    both = table.assign(node="r2")
    fig = subspace.plot_effects(pd.concat([table, both], ignore_index=True))
    assert fig.axes[0].images[0].get_array().shape == (4, 5)
