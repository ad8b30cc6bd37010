"""Graph: "reads from" edges, composition, selection, parameters, views; and g.run behaviour."""

import matplotlib
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import reftgraph as rg

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def llama():
    return rg.models.tiny("llama")


def site(component, layer, **kwargs):
    return rg.Site(component, layer, positions=kwargs.pop("positions", "last"), **kwargs)


# -- edges ------------------------------------------------------------------------

def test_nodes_on_one_stream_read_from_earlier_nodes():
    g = rg.Graph()
    g.add(site("mlp_out", 1), rg.Ablate(), name="late")       # added first, runs last
    g.add(site("resid_pre", 0), rg.Ablate(), name="early")
    g.add(site("head_out", 0, head=1), rg.Ablate(), name="head")
    g.add(site("resid_post", 0), rg.Collect(), name="c")
    assert set(g.edges) == {("early", "head"), ("early", "c"), ("early", "late"),
                            ("head", "c"), ("head", "late")}


def test_collect_nodes_have_no_outgoing_edges():
    g = rg.Graph()
    g.add(site("resid_pre", 0), rg.Collect(), name="c0")
    g.add(site("resid_post", 0), rg.Ablate(), name="a")
    g.add(site("resid_post", 0), rg.Collect(), name="c1")     # same place, after a
    g.add(site("resid_post", 1), rg.Collect(), name="c2")
    assert set(g.edges) == {("a", "c1"), ("a", "c2")}
    assert g.dag.out_degree("c0") == g.dag.out_degree("c1") == g.dag.out_degree("c2") == 0


def test_same_place_nodes_feed_later_ones_only():
    g = rg.Graph()
    g.add(site("resid_post", 0), rg.Add(torch.ones(32)), name="first")
    g.add(site("resid_post", 0), rg.Add(torch.ones(32)), name="second")
    assert list(g.edges) == [("first", "second")]


def test_nodes_on_other_streams_are_not_connected():
    g = rg.Graph()
    g.add(site("resid_pre", 0), rg.Ablate(), name="base0")
    g.add(site("resid_post", 1), rg.Collect(), name="s1", stream="s1")
    assert list(g.edges) == []
    assert g.streams == {"base", "s1"}


def test_patch_reads_upstream_nodes_of_its_source_stream():
    g = rg.Graph()
    g.add(site("resid_pre", 0), rg.Add(torch.ones(32)), name="src_early", stream="source")
    g.add(site("mlp_out", 1), rg.Add(torch.ones(32)), name="src_late", stream="source")
    g.add(site("resid_pre", 0), rg.Add(torch.ones(32)), name="base_early")
    g.add(site("resid_pre", 1), rg.Patch("source"), name="p")
    g.add(site("resid_post", 1), rg.Collect(), name="out")
    assert ("src_early", "p") in g.edges
    assert ("src_late", "p") not in g.edges      # downstream of the source site
    assert ("base_early", "p") not in g.edges    # the patch overwrites, it does not read the base
    assert ("p", "out") in g.edges               # later base nodes see the patch
    assert list(g.dag.predecessors("p")) == ["src_early"]


def test_patch_with_its_own_source_site_reads_upstream_of_that_site():
    g = rg.Graph()
    g.add(site("resid_post", 0), rg.Add(torch.ones(32)), name="at_src", stream="s1")
    g.add(site("mlp_out", 0), rg.Add(torch.ones(32)), name="before_src", stream="s1")
    g.add(site("resid_pre", 1), rg.Add(torch.ones(32)), name="after_src", stream="s1")
    g.add(site("resid_post", 1), rg.Patch("s1", site=site("resid_post", 0)), name="p")
    assert set(g.dag.predecessors("p")) == {"at_src", "before_src"}
    assert g["p"].reads == ("s1", site("resid_post", 0))


def test_patch_edge_does_not_depend_on_insertion_order():
    g = rg.Graph()
    g.add(site("resid_pre", 1), rg.Patch("source", site=site("resid_post", 0)), name="p")
    g.add(site("resid_post", 0), rg.Add(torch.ones(32)), name="s0", stream="source")
    assert ("s0", "p") in g.edges


def test_patch_sees_a_source_edit_added_after_it(llama):
    """The behaviour the edge above should describe: p reads s0's edit whichever is added first."""
    prompts, sources = ["hello", "hi"], {"source": ["abc", "xyz"]}

    def logits(order):
        g = rg.Graph()
        for name in order:
            if name == "p":
                g.add(site("resid_pre", 1), rg.Patch("source", site=site("resid_post", 0)), name="p")
            else:
                g.add(site("resid_post", 0), rg.Add(torch.full((32,), 10.0)), name="s0", stream="source")
        return g.run(llama, prompts, sources=sources).next_token_logits

    plain = logits(["p"])
    torch.testing.assert_close(logits(["p", "s0"]), logits(["s0", "p"]), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(["p", "s0"]), plain, atol=1e-3)


def test_negative_layers_do_not_make_cycles():
    import networkx as nx

    g = rg.Graph()
    g.add(site("resid_post", -1), rg.Add(torch.ones(32)), name="end")
    g.add(site("resid_pre", 0), rg.Add(torch.ones(32)), name="start")
    assert nx.is_directed_acyclic_graph(g.dag)


# -- composition and selection --------------------------------------------------------

def two_graphs():
    g1, g2 = rg.Graph(), rg.Graph()
    g1.add(site("resid_pre", 0), rg.Add(torch.ones(32)), name="a")
    g1.add(site("resid_post", 1), rg.Collect(), name="c")
    g2.add(site("head_out", 1, head=0), rg.Patch("source"), name="p")
    g2.add(site("mlp_out", 0), rg.Ablate(), name="z", stream="source")
    return g1, g2


def test_compose_keeps_both_sets_of_nodes():
    g1, g2 = two_graphs()
    g = g1 | g2
    assert [n.name for n in g] == ["a", "c", "p", "z"]
    assert all(g[n.name] is n for n in g1.nodes + g2.nodes)
    assert g.streams == {"base", "source"}
    # edges are made across the two graphs
    assert set(g.edges) == {("a", "c"), ("p", "c"), ("z", "p")}
    # the operands are unchanged
    assert [n.name for n in g1] == ["a", "c"] and [n.name for n in g2] == ["p", "z"]
    assert set(g1.edges) == {("a", "c")}


def test_subgraph():
    g1, g2 = two_graphs()
    g = g1 | g2
    sub = g.subgraph(["z", "c", "p"])
    assert [n.name for n in sub] == ["c", "p", "z"]  # in the graph's order
    assert set(sub.edges) == {("z", "p"), ("p", "c")}
    assert sub["p"].op is g["p"].op  # ops are shared, not copied
    assert len(g) == 4
    with pytest.raises(KeyError, match="no node 'nope'"):
        g.subgraph(["a", "nope"])


def test_getitem_contains_len():
    g1, _ = two_graphs()
    assert "a" in g1 and "p" not in g1
    assert len(g1) == 2
    assert g1["c"].site == site("resid_post", 1)
    with pytest.raises(KeyError, match="no node 'x'"):
        g1["x"]


# -- parameters --------------------------------------------------------------------

def test_num_parameters_and_freeze():
    g = rg.Graph()
    g.add(site("resid_post", 0), rg.Add(torch.ones(32), trainable=True), name="steer")
    g.add(site("resid_post", 1), rg.Add(torch.ones(32)), name="fixed")
    g.add(site("mlp_out", 1), rg.LoReFT(width=32, rank=4), name="reft")
    assert g.num_parameters() == 32 + (32 * 4 + 4 * 32 + 4)
    assert g.freeze() is g
    assert g.num_parameters() == 0
    assert g.num_parameters(trainable_only=False) == 32 + 260
    assert not any(p.requires_grad for p in g.parameters())


def test_trainable_add_gets_gradients(llama):
    vector = torch.zeros(32)
    g = rg.Graph()
    g.add(site("resid_post", 0), rg.Add(vector, trainable=True), name="steer")
    out = g.run(llama, ["hello", "hi"])
    out.next_token_logits.sum().backward()
    grad = g["steer"].op.vector.grad
    assert grad is not None and grad.shape == (32,) and bool(grad.abs().sum() > 0)
    assert torch.equal(vector, torch.zeros(32))  # the op holds a copy


def test_auto_names_are_unique():
    g = rg.Graph()
    names = [g.add(site("resid_post", 0), rg.Add(torch.ones(32))) for _ in range(3)]
    names.append(g.add(site("resid_post", 0), rg.Collect()))
    names.append(g.add(site("mlp_out", 1), rg.Add(torch.ones(32))))
    assert len(set(names)) == 5
    assert [n.name for n in g] == names


def test_auto_names_skip_names_given_by_hand():
    g = rg.Graph()
    first = g.add(site("resid_post", 0), rg.Ablate())
    g.add(site("resid_post", 1), rg.Ablate(), name=first + "_2")
    names = [g.add(site("resid_post", 0), rg.Ablate()) for _ in range(2)]
    assert len({first, first + "_2", *names}) == 4


# -- views -------------------------------------------------------------------------

def summary_graph():
    g = rg.Graph()
    g.add(site("resid_post", 0, subspace=(0, 1)), rg.Add(torch.ones(2), trainable=True), name="steer")
    g.add(rg.Site("head_out", 1, head=(1, 3), positions=[0]), rg.Patch("source"), name="p")
    g.add(rg.Site("mlp_out", 1, positions="f2+l2"), rg.Collect(), name="c", stream="source")
    return g


def test_summary():
    df = summary_graph().summary()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["name", "op", "stream", "component", "layer", "positions", "head", "subspace",
                                "reads", "params"]
    rows = {r["name"]: {k: None if pd.isna(v) else v for k, v in r.items() if k != "name"}
            for r in df.to_dict("records")}
    assert rows["steer"] == {"op": "Add", "stream": "base", "component": "resid_post", "layer": 0,
                             "positions": "last", "head": None, "subspace": "0,1", "reads": None, "params": 2}
    assert rows["p"] == {"op": "Patch", "stream": "base", "component": "head_out", "layer": 1,
                         "positions": "[0]", "head": "1,3", "subspace": None, "reads": "source", "params": 0}
    assert rows["c"] == {"op": "Collect", "stream": "source", "component": "mlp_out", "layer": 1,
                         "positions": "f2+l2", "head": None, "subspace": None, "reads": None, "params": 0}


def test_summary_of_an_empty_graph():
    df = rg.Graph().summary()
    assert len(df) == 0 and "name" in df.columns


def test_repr_html_is_a_table_of_the_nodes():
    html = summary_graph()._repr_html_()
    assert "<table" in html and "</table>" in html
    for name in ("steer", "p", "c"):
        assert f"<td>{name}</td>" in html
    assert "3 nodes" in html and "2 trainable parameters" in html


def test_repr_lists_the_nodes():
    text = repr(summary_graph())
    assert text.splitlines()[0] == "Graph(3 nodes, 2 trainable parameters)"
    assert "p: Patch head_out[1].h1+h3 pos=[0]" in text
    assert "c: Collect mlp_out[1] pos=f2+l2 @source" in text


def test_draw_returns_a_figure():
    import matplotlib.pyplot as plt

    g = summary_graph()
    fig = g.draw()
    try:
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "source"]
    finally:
        plt.close(fig)
    fig2, ax2 = plt.subplots()
    try:
        assert g.draw(ax=ax2) is fig2
    finally:
        plt.close(fig2)


# -- running on tiny llama ------------------------------------------------------------

PROMPTS = ["hello world", "hi", "abc"]  # 11, 2 and 3 tokens


def real_positions(mask):
    return [torch.nonzero(row).flatten().tolist() for row in mask]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collect_first_last_on_rows_of_different_lengths(llama, side):
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="f2+l2"), rg.Collect(), name="c")
    out = g.run(llama, PROMPTS, padding_side=side)
    assert out["c"].shape == (3, 4, 32)
    assert out.valid["c"].tolist() == [[True, True, True, True],
                                       [True, True, False, False],
                                       [True, True, False, True]]
    # the valid slots hold layer 0's output at first 2 / last 2 real tokens
    mask = out.attention_mask
    hidden = llama.hf(input_ids=out.input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                      output_hidden_states=True).hidden_states[1]
    real = real_positions(out.attention_mask)
    for b, rel in enumerate([[0, 1, 9, 10], [0, 1], [0, 1, 2]]):
        got = out["c"][b][out.valid["c"][b]]
        torch.testing.assert_close(got, hidden[b, [real[b][r] for r in rel]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_next_token_logits_at_the_last_real_token(llama, side):
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="last"), rg.Collect(), name="c")
    out = g.run(llama, PROMPTS, padding_side=side)
    last = [r[-1] for r in real_positions(out.attention_mask)]
    if side == "left":
        assert last == [10, 10, 10]
    else:
        assert last == [10, 1, 2]
    assert out.next_token_logits.shape == (3, 259)
    torch.testing.assert_close(out.next_token_logits, out.logits[torch.arange(3), last], atol=0, rtol=0)
    for b, prompt in enumerate(PROMPTS):  # each prompt alone, without padding
        ids = llama.tokenizer(prompt, return_tensors="pt")["input_ids"]
        alone = llama.hf(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(out.next_token_logits[b], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_left_and_right_padding_agree(family):
    lm = rg.models.tiny(family)
    g = rg.Graph()
    g.add(rg.Site("resid_pre", 1, positions="last"), rg.Add(torch.ones(32)), name="steer")
    g.add(rg.Site("mlp_out", 1, positions="prompt"), rg.Collect(), name="m")
    left = g.run(lm, PROMPTS, padding_side="left")
    right = g.run(lm, PROMPTS, padding_side="right")
    assert left.input_ids[1, 0] == lm.tokenizer.pad_token_id and right.input_ids[1, -1] == lm.tokenizer.pad_token_id
    torch.testing.assert_close(left.next_token_logits, right.next_token_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(left["m"][left.valid["m"]], right["m"][right.valid["m"]], atol=1e-5, rtol=0)


def test_padding_side_argument_leaves_the_tokenizer_alone(llama):
    side = llama.tokenizer.padding_side
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="last"), rg.Collect(), name="c")
    g.run(llama, PROMPTS, padding_side="left" if side == "right" else "right")
    assert llama.tokenizer.padding_side == side
