"""Receiver inputs (q_in, k_in, v_in, mlp_in) and the stream's ends (embed, logits_in,
logits): what they mean, checked through identities with the components they feed (the
per-op oracle matrix is in test_oracle.py), their locality, and their refusals."""

import tempfile

import pytest
import torch

import reftgraph as rg
from reftgraph.engine import compile_graph, forward, tokenize

FAMILIES = ("llama", "gpt2", "gpt_neox", "gemma3_text")
BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]   # the same lengths as BASE, row by row
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return rg.models.tiny(request.param)


def run(lm, nodes, side="left", **kwargs):
    g = rg.Graph()
    for i, (site, op) in enumerate(nodes):
        g.add(site, op, name=f"n{i}")
    sources = {"source": SOURCE} if "source" in g.streams else None
    return g.run(lm, BASE, sources=sources, padding_side=side, **kwargs)


def same(a, b, atol=ATOL):
    """Equal logits at the real tokens (padded places are computed but never read)."""
    real = a.attention_mask[a.rows["base"]].bool()
    assert torch.equal(real, b.attention_mask[b.rows["base"]].bool())
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=atol, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("reader", ["q", "k", "v"])
def test_patching_every_heads_input_is_patching_what_it_computes(lm, reader, side):
    """Each head reads the source's stream: its query (key, value) is the source's."""
    layer = lm.arch.n_layers - 1
    ours = run(lm, [(rg.Site(f"{reader}_in", layer), rg.Patch("source"))], side)
    theirs = run(lm, [(rg.Site(reader, layer), rg.Patch("source"))], side)
    same(ours, theirs)
    assert not torch.allclose(ours.logits, run(lm, [], side).logits, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_patching_all_of_attentions_inputs_is_patching_its_output(lm, side):
    layer = lm.arch.n_layers - 1
    ours = run(lm, [(rg.Site(c, layer), rg.Patch("source")) for c in ("q_in", "k_in", "v_in")], side)
    same(ours, run(lm, [(rg.Site("attn_out", layer), rg.Patch("source"))], side))


@pytest.mark.parametrize("side", ["left", "right"])
def test_patching_the_mlps_input_is_patching_its_output(lm, side):
    ours = run(lm, [(rg.Site("mlp_in", 0), rg.Patch("source"))], side)
    same(ours, run(lm, [(rg.Site("mlp_out", 0), rg.Patch("source"))], side))


@pytest.mark.parametrize("side", ["left", "right"])
def test_an_mlp_sharing_attentions_norm_reads_its_own_copy(side):
    """GPT-J: attention and the MLP read one norm; patching the MLP's copy leaves attention's."""
    lm = rg.models.tiny("gptj")
    assert "mlp_in_shared" in lm.arch.blocks[0].reads
    same(run(lm, [(rg.Site("mlp_in", 0), rg.Patch("source"))], side),
         run(lm, [(rg.Site("mlp_out", 0), rg.Patch("source"))], side))


@pytest.mark.parametrize("component", ["q_in", "k_in", "v_in", "mlp_in", "embed", "logits_in", "logits"])
def test_an_edit_that_changes_nothing_changes_nothing_exactly(lm, component):
    width = lm.arch.width(component)
    edited = rg.Graph()
    edited.add(rg.Site(component, layer=0 if component not in ("embed", "logits_in", "logits") else None),
               rg.Add(torch.zeros(width)), name="n")
    assert torch.equal(edited.run(lm, BASE).logits, rg.Graph().run(lm, BASE).logits)


def test_one_heads_query_input_moves_that_head_alone(lm):
    n = lm.arch.heads("q_in")
    g = rg.Graph()
    g.add(rg.Site("q_in", 0, head=n - 1, positions=[2]), rg.Add(torch.randn(lm.arch.width("q_in")) * 3), name="a")
    g.add(rg.Site("head_out", 0), rg.Collect(), name="h")
    clean = rg.Graph()
    clean.add(rg.Site("head_out", 0), rg.Collect(), name="h")
    diff = (g.run(lm, BASE)["h"] - clean.run(lm, BASE)["h"]).abs().amax(-1)     # [rows, positions, heads]
    moved = {tuple(x) for x in (diff > 1e-6).nonzero().tolist()}
    assert moved and {(p, h) for _, p, h in moved} == {(2, n - 1)}


def test_edits_of_one_heads_input_compose(lm):
    """Two edits of the same copies, and the same as one: the second starts from the first."""
    width, site = lm.arch.width("k_in"), rg.Site("k_in", 0, head=0, positions="last")
    a, b = torch.randn(width), torch.randn(width)
    same(run(lm, [(site, rg.Add(a)), (site, rg.Add(b))]), run(lm, [(site, rg.Add(a + b))]))
    same(run(lm, [(site, rg.Add(a)), (site, rg.Ablate("zero"))]), run(lm, [(site, rg.Ablate("zero"))]))


def test_the_ends_are_what_the_run_gives(lm):
    g = rg.Graph()
    g.add(rg.Site("logits_in"), rg.Collect(), name="li")
    g.add(rg.Site("resid_post", -1), rg.Collect(), name="rp")
    g.add(rg.Site("logits"), rg.Collect(), name="lo")
    g.add(rg.Site("embed", positions="last"), rg.Collect(), name="e")
    out = g.run(lm, BASE, padding_side="right")
    real = out.valid["lo"]
    torch.testing.assert_close(out["li"][real], out["rp"][real], atol=0, rtol=0)
    torch.testing.assert_close(out["lo"][real], out.logits[real], atol=0, rtol=0)
    ids = lm.tokenizer(BASE[1], return_tensors="pt")["input_ids"][0, -1]
    want = lm.hf.get_input_embeddings()(ids) * lm.arch.blocks[0].ends["embed"][1]
    torch.testing.assert_close(out["e"][1, 0], want, atol=ATOL, rtol=0)


def test_patching_the_embeddings_is_running_the_source(lm):
    patched = run(lm, [(rg.Site("embed"), rg.Patch("source"))], "right")
    alone = rg.Graph().run(lm, SOURCE, padding_side="right")
    same(patched, alone)


def test_adding_to_the_logits_adds_to_the_output():
    lm = rg.models.tiny("llama")
    bias = torch.randn(lm.arch.width("logits"))
    g = rg.Graph()
    g.add(rg.Site("logits", positions="last"), rg.Add(bias), name="b")
    out, clean = g.run(lm, BASE, padding_side="left"), rg.Graph().run(lm, BASE, padding_side="left")
    torch.testing.assert_close(out.logits[:, -1], clean.logits[:, -1] + bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[:, :-1], clean.logits[:, :-1], atol=0, rtol=0)


def test_sites_of_the_ends_take_their_layer_and_save_it():
    assert rg.Site("embed").layer == 0 and rg.Site("logits").layer == -1 and rg.Site("logits_in").layer == -1
    with pytest.raises(rg.SiteError, match="resid_pre needs a layer"):
        rg.Site("resid_pre")
    g = rg.Graph()
    g.add(rg.Site("embed", positions="last"), rg.Add(torch.ones(32)), name="e")
    lm = rg.models.tiny("llama")
    with tempfile.TemporaryDirectory() as d:
        g.save(f"{d}/g")
        back = rg.load_graph(f"{d}/g")
    assert back["e"].site == g["e"].site
    assert torch.equal(back.run(lm, BASE).logits, g.run(lm, BASE).logits)


@pytest.mark.parametrize("site, message", [
    (rg.Site("embed", 1), "embed is before the first block: layer 0"),
    (rg.Site("logits", 0), "logits is after the last block: layer 1"),
    (rg.Site("q_in", 0, head=4), "head 4 out of range; q_in has 4 heads"),
    (rg.Site("k_in", 0, head=2), "head 2 out of range; k_in has 2"),
])
def test_bad_sites_are_refused_before_the_forward(site, message):
    g = rg.Graph()
    g.add(site, rg.Collect(), name="n")
    with pytest.raises(rg.SiteError, match=message):
        g.run(rg.models.tiny("llama"), BASE)


@pytest.mark.parametrize("family, component, reason", [
    ("bloom", "embed", "transforms the embeddings before the first block"),   # an embedding norm
    ("gemma2", "logits", "changes the logits after its output layer"),        # a soft cap
])
def test_what_cannot_be_proven_is_refused_with_the_reason(family, component, reason):
    arch = rg.models.tiny(family).arch
    assert reason in arch.table()[component]


def test_a_run_for_the_hidden_state_refuses_logits():
    lm = rg.models.tiny("llama")
    g = rg.Graph()
    g.add(rg.Site("logits"), rg.Collect(), name="lo")
    inputs, batch = tokenize(lm, {"base": BASE})
    with pytest.raises(rg.SiteError, match="use logits_in"):
        forward(compile_graph(g, lm.arch), lm, inputs, batch, hidden=True)


def test_sweeps_over_head_inputs_and_ends():
    lm = rg.models.tiny("llama")
    data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["ab d c", "xy w z"], correct=["c", "z"], wrong=["d", "w"])
    q_in = rg.patching.sweep(lm, data, "q_in", layers=[1], progress=False)
    q = rg.patching.sweep(lm, data, "q", layers=[1], progress=False)
    torch.testing.assert_close(torch.tensor(q_in["value"].values), torch.tensor(q["value"].values), atol=ATOL, rtol=0)
    embed = rg.patching.sweep(lm, data, "embed", positions=[-1, -2], progress=False)
    assert embed["layer"].tolist() == [0, 0]
    est = rg.patching.attribute(lm, data, ["q_in", "mlp_in"], layers=[1], progress=False)
    assert len(est) == 4 * len(est["position"].unique()) + len(est["position"].unique())


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_patch_reads_a_head_input_as_the_source_streams_edits_left_it(family):
    """The source stream's own edit of a head input shows in what a patch reads from it (the
    copies are kept between edits; the projection's output cannot give them back)."""
    from test_properties import check_against_oracle

    lm, g = rg.models.tiny(family), rg.Graph()
    kinds = {g.add(rg.Site("k_in", 0, positions=[0]), rg.Ablate("zero"), name="n0", stream="source"): "zero",
             g.add(rg.Site("k_in", 0, positions=[0]), rg.Patch("source"), name="n1"): "patch"}
    for side in ("left", "right"):
        check_against_oracle(lm, g, kinds, side)
