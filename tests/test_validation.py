"""Every validation error: a SiteError that names the node, the site and the valid range,
raised before the model runs a single forward pass."""

import pytest
import torch

import reftgraph as rg
from reftgraph.engine import compile_graph
from reftgraph import arch

PROMPTS = ["hello", "hi"]  # 5 and 2 tokens with the tiny byte-level tokenizer


@pytest.fixture(scope="module")
def llama():
    return rg.models.tiny("llama")  # 2 layers, width 32, 4 heads, 2 kv heads, head_dim 8, mlp 48


@pytest.fixture(scope="module")
def gpt2():
    return rg.models.tiny("gpt2")  # 2 layers, width 32, 4 heads (no grouped-query attention)


@pytest.fixture(scope="module")
def lm(llama):
    return llama  # the model conftest's ``forwards`` counts


def graph(site, op, name="node", **kwargs):
    g = rg.Graph()
    g.add(site, op, name=name, **kwargs)
    return g


def assert_names(err, *parts):
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in the message:\n{message}"


def test_the_forward_counter_sees_a_run(llama, forwards):
    """The guard used below does detect a forward pass."""
    graph(rg.Site("resid_post", 0, positions="last"), rg.Collect()).run(llama, PROMPTS)
    assert forwards


# -- at Site construction -------------------------------------------------------

def test_unknown_component():
    with pytest.raises(rg.SiteError, match="unknown component 'resid'") as err:
        rg.Site("resid", layer=0)
    assert_names(err, "valid components: resid_pre, resid_mid, resid_post", "head_out, q, k, v")


def test_head_on_a_non_head_component():
    with pytest.raises(rg.SiteError, match="resid_post has no heads") as err:
        rg.Site("resid_post", layer=0, head=1)
    assert_names(err, "head= is only for head_out, q, k, v")


@pytest.mark.parametrize("bad", ["f3+x", "first", "l3", "f3+l", "f+l3", "last3", "f3l3"])
def test_position_selector_syntax(bad):
    with pytest.raises(rg.SiteError, match=f"unknown position selector '{bad.replace('+', '[+]')}'") as err:
        rg.Site("resid_post", layer=0, positions=bad)
    assert_names(err, "'last'", "'prompt'", "'all'", "'fN+lM'")


# -- against the model, before the forward pass ---------------------------------

@pytest.mark.parametrize("layer", [2, 5, -3])
def test_layer_out_of_range(llama, forwards, layer):
    g = graph(rg.Site("resid_post", layer, positions="last"), rg.Collect(), name="deep")
    with pytest.raises(rg.SiteError, match=f"layer {layer} out of range") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'deep'", f"resid_post[{layer}] pos=last", "valid layers 0..1", "-2..-1")
    assert not forwards


@pytest.mark.parametrize("layer", [1, -1, -2])
def test_layers_in_range_run(llama, layer):
    out = graph(rg.Site("resid_post", layer, positions="last"), rg.Collect(), name="c").run(llama, PROMPTS)
    assert out["c"].shape == (2, 1, 32)


@pytest.mark.parametrize("component", ["q", "head_out"])
def test_query_head_out_of_range(llama, forwards, component):
    g = graph(rg.Site(component, 1, head=4, positions=[0]), rg.Collect(), name="h")
    with pytest.raises(rg.SiteError, match="head 4 out of range") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'h'", f"{component}[1].h4 pos=[0]", f"{component} has 4 heads", "valid heads 0..3")
    assert "key-value" not in str(err.value)
    assert not forwards


@pytest.mark.parametrize("component", ["k", "v"])
def test_key_value_head_out_of_range(llama, forwards, component):
    # head 2 is a valid query head but llama's k and v have 2 key-value heads
    g = graph(rg.Site(component, 0, head=(0, 2), positions="last"), rg.Collect(), name="kv")
    with pytest.raises(rg.SiteError, match="head 2 out of range") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'kv'", f"{component}[0].h0+h2 pos=last",
                 f"{component} has 2 key-value heads", "valid heads 0..1")
    assert not forwards


def test_heads_in_range_run(llama):
    g = rg.Graph()
    g.add(rg.Site("q", 0, head=3, positions="last"), rg.Collect(), name="q")
    g.add(rg.Site("k", 0, head=1, positions="last"), rg.Collect(), name="k")
    out = g.run(llama, PROMPTS)
    assert out["q"].shape == out["k"].shape == (2, 1, 1, 8)


def test_key_head_message_without_grouped_query_attention(gpt2):
    g = graph(rg.Site("k", 0, head=4, positions="last"), rg.Collect(), name="kv")
    with pytest.raises(rg.SiteError, match="k has 4 heads: valid heads 0..3") as err:
        g.run(gpt2, PROMPTS)
    assert "key-value" not in str(err.value)


@pytest.mark.parametrize("positions, shown, row, tokens", [
    (50, "[50]", 0, 5),
    ([3], "[3]", 1, 2),       # fits "hello" (row 0) but not "hi" (row 1)
    ([0, -3], "[0,-3]", 1, 2),
])
def test_positions_beyond_the_prompt(llama, forwards, positions, shown, row, tokens):
    g = graph(rg.Site("resid_post", 0, positions=positions), rg.Collect(), name="far")
    with pytest.raises(rg.SiteError, match="beyond the prompt") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'far'", f"resid_post[0] pos={shown}", f"row {row} ({tokens} tokens",
                 f"valid positions 0..{tokens - 1} or -{tokens}..-1")
    assert not forwards


@pytest.mark.parametrize("site, width", [
    (rg.Site("resid_post", 0, positions="last", subspace=(31, 32)), 32),
    (rg.Site("mlp_act", 1, positions="last", subspace=(48,)), 48),
    (rg.Site("head_out", 1, head=0, positions="last", subspace=(8,)), 8),
])
def test_subspace_beyond_the_width(llama, forwards, site, width):
    g = graph(site, rg.Ablate("zero"), name="sub")
    bad = site.subspace[-1]
    with pytest.raises(rg.SiteError, match=f"subspace dim {bad} beyond the width") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'sub'", str(site), f"{site.component} ({width}: valid dims 0..{width - 1})")
    assert not forwards


def test_subspace_beyond_the_rank_of_a_learned_basis(llama, forwards):
    site = rg.Site("resid_post", 0, positions="last", subspace=(3, 4))
    g = graph(site, rg.LoReFT(width=32, rank=4), name="reft")
    with pytest.raises(rg.SiteError, match="subspace dim 4") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'reft'", str(site), "0..3")
    assert not forwards


def test_patch_source_stream_not_given(llama, forwards):
    g = graph(rg.Site("resid_pre", 1, positions="last"), rg.Patch(source="s1"), name="p")
    with pytest.raises(rg.SiteError, match="stream 's1' was not given") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'p'", "resid_pre[1] pos=last", "sources={'s1': [...]}", "given: ['base']")
    assert not forwards


def test_source_that_no_node_reads(llama, forwards):
    g = graph(rg.Site("resid_pre", 1, positions="last"), rg.Patch(source="s1"), name="p")
    with pytest.raises(rg.SiteError, match=r"sources \['s2'\] are not read by any node") as err:
        g.run(llama, PROMPTS, sources={"s1": ["one", "two"], "s2": ["three"]})
    assert_names(err, "streams it uses: ['base', 's1']")
    assert not forwards


def test_source_with_the_wrong_number_of_rows(llama, forwards):
    g = graph(rg.Site("resid_pre", 1, positions="last"), rg.Patch(), name="p")
    with pytest.raises(rg.SiteError, match="has 3 rows") as err:
        g.run(llama, PROMPTS, sources={"source": ["a", "b", "c"]})
    assert_names(err, "node 'p'", "resid_pre[1] pos=last", "'base' stream 2")
    assert not forwards


@pytest.mark.parametrize("op_name, op", [
    ("Add", rg.Add(torch.ones(31))),
    ("Set", rg.Set(torch.ones(33))),
])
def test_vector_of_the_wrong_width(llama, forwards, op_name, op):
    g = graph(rg.Site("resid_post", 0, positions="last"), op, name="steer")
    with pytest.raises(rg.SiteError, match=f"{op_name} has width 3[13], the site needs 32") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'steer'", "resid_post[0] pos=last", "resid_post width")
    assert not forwards


def test_vector_of_the_residual_width_at_the_mlp_activation(llama, forwards):
    g = graph(rg.Site("mlp_act", 0, positions="last"), rg.Add(torch.ones(32)), name="steer")
    with pytest.raises(rg.SiteError, match="Add has width 32, the site needs 48") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'steer'", "mlp_act[0] pos=last")
    assert not forwards


def test_subspace_and_add_width_mismatch(llama, forwards):
    site = rg.Site("resid_post", 0, positions="last", subspace=(0, 1, 2))
    g = graph(site, rg.Add(torch.ones(32)), name="steer")
    with pytest.raises(rg.SiteError, match="Add has width 32, the site needs 3") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'steer'", "resid_post[0] pos=last dims=[0,1,2]", "subspace")
    assert not forwards


def test_subspace_and_add_of_matching_width_run(llama):
    g = graph(rg.Site("resid_post", 0, positions="last", subspace=(0, 1, 2)), rg.Add(torch.ones(3)))
    assert g.run(llama, PROMPTS).next_token_logits.shape == (2, 259)


def test_duplicate_node_names():
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="last"), rg.Collect(), name="x")
    with pytest.raises(rg.SiteError, match="duplicate node name 'x'") as err:
        g.add(rg.Site("mlp_out", 1, positions=[0]), rg.Collect(), name="x")
    assert_names(err, "mlp_out[1] pos=[0]", "resid_post[0] pos=last")
    assert len(g) == 1


def test_composing_graphs_with_clashing_names():
    g1 = graph(rg.Site("resid_post", 0, positions="last"), rg.Collect(), name="x")
    g2 = graph(rg.Site("mlp_out", 1, positions=[0]), rg.Collect(), name="x")
    with pytest.raises(rg.SiteError, match="cannot compose: both graphs have a node named 'x'") as err:
        g1 | g2
    assert_names(err, "resid_post[0] pos=last", "mlp_out[1] pos=[0]")


@pytest.mark.parametrize("dims1, dims2", [((0, 1), (1, 2)), (None, (5,)), ((3,), None)])
def test_composing_overlapping_subspaces_at_one_site(dims1, dims2):
    s1 = rg.Site("resid_post", 0, positions="last", subspace=dims1)
    s2 = rg.Site("resid_post", 0, positions="last", subspace=dims2)
    g1 = graph(s1, rg.Ablate("zero"), name="a")
    g2 = graph(s2, rg.Ablate("zero"), name="b")
    with pytest.raises(rg.SiteError, match="cannot compose: nodes 'a' .* and 'b' .* edit overlapping subspaces") as err:
        g1 | g2
    assert_names(err, str(s1), str(s2), "disjoint subspace= dims")


def test_composing_disjoint_subspaces(llama):
    g1 = graph(rg.Site("resid_post", 0, positions="last", subspace=(0, 1)), rg.Add(torch.ones(2)), name="a")
    g2 = graph(rg.Site("resid_post", 0, positions="last", subspace=(2, 3)), rg.Add(torch.ones(2)), name="b")
    g = g1 | g2
    assert [n.name for n in g] == ["a", "b"]
    assert g.run(llama, PROMPTS).next_token_logits.shape == (2, 259)


@pytest.mark.parametrize("other", [
    rg.Site("resid_post", 1, positions=[2], subspace=(0, 1)),     # another layer
    rg.Site("resid_post", 0, positions=[0, 1], subspace=(0, 1)),  # other positions
    rg.Site("mlp_out", 0, positions=[2], subspace=(0, 1)),        # another component
])
def test_composing_edits_at_other_places(other):
    g1 = graph(rg.Site("resid_post", 0, positions=[2], subspace=(0, 1)), rg.Ablate(), name="a")
    g2 = graph(other, rg.Ablate(), name="b")
    assert len(g1 | g2) == 2


def test_composing_disjoint_heads():
    g1 = graph(rg.Site("head_out", 0, head=0, positions="last"), rg.Ablate(), name="a")
    g2 = graph(rg.Site("head_out", 0, head=1, positions="last"), rg.Ablate(), name="b")
    assert len(g1 | g2) == 2
    g3 = graph(rg.Site("head_out", 0, head=(1, 2), positions="last"), rg.Ablate(), name="c")
    with pytest.raises(rg.SiteError, match="overlapping"):
        g2 | g3


@pytest.mark.parametrize("p1, p2", [("last", [-1]), ("all", [0])])
def test_composing_overlapping_positions_at_one_site(p1, p2):
    g1 = graph(rg.Site("resid_post", 0, positions=p1), rg.Ablate(), name="a")
    g2 = graph(rg.Site("resid_post", 0, positions=p2), rg.Ablate(), name="b")
    with pytest.raises(rg.SiteError, match="overlapping"):
        g1 | g2


@pytest.mark.parametrize("site, source_site", [
    (rg.Site("resid_pre", 0, positions="last"), rg.Site("resid_post", 1, positions="last")),
    (rg.Site("attn_out", 1, positions="last"), rg.Site("mlp_out", 1, positions="last")),
    (rg.Site("q", 1, head=0, positions="last"), rg.Site("v", 1, head=0, positions="last")),
    (rg.Site("resid_post", 0, positions="last"), rg.Site("resid_pre", -1, positions="last")),
])
def test_patch_reading_a_later_source_site(llama, forwards, site, source_site):
    g = graph(site, rg.Patch("source", site=source_site), name="p")
    with pytest.raises(rg.SiteError, match="comes after the site in the forward pass") as err:
        g.run(llama, PROMPTS, sources={"source": ["abc", "xyz"]})
    assert_names(err, "node 'p'", str(site), f"source site {source_site}")
    assert not forwards


def test_patch_reading_an_earlier_source_site_runs(llama):
    g = graph(rg.Site("resid_post", 1, positions="last"),
              rg.Patch("source", site=rg.Site("resid_pre", 0, positions=[0])), name="p")
    assert g.run(llama, PROMPTS, sources={"source": ["abc", "xyz"]}).next_token_logits.shape == (2, 259)


def test_patch_source_of_another_shape(llama, forwards):
    site = rg.Site("head_out", 1, head=(0, 1), positions="last")
    g = graph(site, rg.Patch("source", site=rg.Site("head_out", 0, head=2, positions="last")), name="p")
    with pytest.raises(rg.SiteError, match="has another shape than the site") as err:
        g.run(llama, PROMPTS, sources={"source": ["abc", "xyz"]})
    assert_names(err, "node 'p'", str(site), "head_out[0].h2 pos=last")
    assert not forwards


def test_patch_source_head_out_of_range(llama, forwards):
    site = rg.Site("k", 1, head=0, positions="last")
    g = graph(site, rg.Patch("source", site=rg.Site("k", 0, head=3, positions="last")), name="p")
    with pytest.raises(rg.SiteError, match="head 3 out of range") as err:
        g.run(llama, PROMPTS, sources={"source": ["abc", "xyz"]})
    assert_names(err, "node 'p'", str(site), "source site k[0].h3 pos=last", "2 key-value heads", "0..1")
    assert not forwards


def test_patch_selecting_another_number_of_positions(llama, forwards):
    g = graph(rg.Site("resid_post", 0, positions="prompt"), rg.Patch("source"), name="p")
    with pytest.raises(rg.SiteError, match="selects") as err:
        g.run(llama, ["hello", "hi"], sources={"source": ["hey", "hello there"]})
    assert_names(err, "node 'p'", "resid_post[0] pos=prompt", "[5, 2] positions per row in 'base'",
                 "[3, 11] in source 'source'")
    assert not forwards


def test_patch_with_same_length_sources_runs(llama):
    g = graph(rg.Site("resid_post", 0, positions="prompt"), rg.Patch("source"), name="p")
    out = g.run(llama, ["hello", "hi"], sources={"source": ["howdy", "yo"]})
    assert out.next_token_logits.shape == (2, 259)


def test_empty_prompt_list(llama, forwards):
    g = graph(rg.Site("resid_post", 0, positions="last"), rg.Collect())
    with pytest.raises(rg.DataError, match="prompts must be a non-empty list of strings"):
        g.run(llama, [])
    assert not forwards


def test_empty_source_list(llama, forwards):
    g = graph(rg.Site("resid_post", 0, positions="last"), rg.Patch("source"))
    with pytest.raises(rg.DataError, match=r"sources\['source'\] must be a non-empty list of strings"):
        g.run(llama, PROMPTS, sources={"source": []})
    assert not forwards


def test_empty_prompt_string(llama, forwards):
    g = graph(rg.Site("resid_post", 0, positions="last"), rg.Collect())
    with pytest.raises(rg.DataError, match="empty prompt"):
        g.run(llama, ["hello", ""])
    assert not forwards


def test_generated_positions_in_a_plain_run(llama, forwards):
    g = graph(rg.Site("resid_post", 0, positions="generated"), rg.Collect(), name="gen")
    with pytest.raises(rg.SiteError, match="only applies during generation") as err:
        g.run(llama, PROMPTS)
    assert_names(err, "node 'gen'", "resid_post[0] pos=generated")
    assert not forwards


# -- architecture families ------------------------------------------------------

def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return OPTForCausalLM(config).eval()


# OPT blocks have no mlp module: fc1 -> activation -> fc2, found by the resolver as the MLP.
OPT = rg.Family(name="opt_by_hand", model_types=("opt",), layers="model.decoder.layers", attn="self_attn",
                attn_proj="self_attn.out_proj", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))


@pytest.fixture
def families(monkeypatch):
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(arch, "FAMILIES", dict(arch.FAMILIES))


def test_unregistered_model_type_is_resolved_and_proven():
    lm = rg.wrap(tiny_opt(), rg.models.tiny_tokenizer())
    table = lm.arch.table()
    assert lm.arch.family.name == "opt" and lm.arch.blocks[0].style == "sequential"
    ends = {c: table.pop(c) for c in ("embed", "logits_in", "logits")}     # outside the blocks: one layer each
    assert "has attention, not a sequence mixer" in table.pop("mixer_out")   # a state-space block's component
    assert "has no cross-attention" in table.pop("cross_attn_out")           # an encoder-decoder's
    assert all(v == "verified" for v in table.values())
    assert ends == {"embed": "on layers 0 only", "logits_in": f"on layers {lm.arch.n_layers - 1} only",
                    "logits": f"on layers {lm.arch.n_layers - 1} only"}
    assert lm.arch.blocks[0].flat == {"mlp_out", "mlp_act", "mlp_in"}   # OPT's MLP sees [batch * tokens, width]


def test_not_a_transformers_model_is_refused():
    with pytest.raises(rg.SiteError, match="Linear is not a transformers model"):
        rg.wrap(torch.nn.Linear(2, 2), rg.models.tiny_tokenizer())


@pytest.fixture
def opt(families):
    rg.register_family(OPT)
    return rg.wrap(tiny_opt(), rg.models.tiny_tokenizer())


def capture(module, io="output"):
    """Record a module's output (or first input) during the next forward."""
    seen = {}
    if io == "output":
        handle = module.register_forward_hook(lambda m, args, out: seen.__setitem__("value", out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("value", args[0]))
    return seen, handle


def test_registered_family_runs(opt):
    assert opt.arch.family.name == "opt_by_hand"
    assert (opt.arch.n_layers, opt.arch.d_model, opt.arch.n_heads, opt.arch.head_dim) == (2, 32, 4, 8)
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="last"), rg.Collect(), name="r0")
    g.add(rg.Site("attn_out", 1, positions="last"), rg.Collect(), name="a1")
    g.add(rg.Site("head_out", 1, head=2, positions="last"), rg.Collect(), name="h1")
    for c in "qkv":
        g.add(rg.Site(c, 0, head=1, positions="last"), rg.Collect(), name=c)
    out = g.run(opt, PROMPTS, padding_side="left")

    layers = opt.hf.model.decoder.layers
    hooks = {"r0": capture(layers[0]), "h1": capture(layers[1].self_attn.out_proj, "input"),
             "a1": capture(layers[1].self_attn), "q": capture(layers[0].self_attn.q_proj),
             "k": capture(layers[0].self_attn.k_proj), "v": capture(layers[0].self_attn.v_proj)}
    try:
        enc = {k: v for k, v in zip(("input_ids", "attention_mask"),
                                    (out.input_ids, out.attention_mask))}
        opt.hf(**enc)
    finally:
        for _, handle in hooks.values():
            handle.remove()

    def last(name):
        value = hooks[name][0]["value"]
        value = value[0] if isinstance(value, tuple) else value
        return value[:, -1]  # left padding: the last column is every row's last token

    torch.testing.assert_close(out["r0"][:, 0], last("r0"), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["a1"][:, 0], last("a1"), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["h1"][:, 0, 0], last("h1").unflatten(-1, (4, 8))[:, 2], atol=1e-5, rtol=0)
    for c in "qkv":
        torch.testing.assert_close(out[c][:, 0, 0], last(c).unflatten(-1, (4, 8))[:, 1], atol=1e-5, rtol=0)


def test_registered_family_validates(opt):
    g = graph(rg.Site("k", 0, head=4, positions="last"), rg.Collect(), name="kv")
    with pytest.raises(rg.SiteError, match="k has 4 heads: valid heads 0..3"):
        g.run(opt, PROMPTS)


def test_flattened_mlp_is_viewed_back_per_token(opt):
    """OPT flattens tokens around fc1/fc2: mlp_act is fc2's input, one row per token."""
    g = graph(rg.Site("mlp_act", 1, positions="last"), rg.Collect(), name="act")
    out = g.run(opt, PROMPTS, padding_side="left")
    seen, handle = capture(opt.hf.model.decoder.layers[1].fc2, "input")
    try:
        opt.hf(input_ids=out.input_ids, attention_mask=out.attention_mask)
    finally:
        handle.remove()
    want = seen["value"].view(len(PROMPTS), out.input_ids.shape[1], -1)[:, -1]
    torch.testing.assert_close(out["act"][:, 0], want, atol=1e-5, rtol=0)
