"""Encoder-decoders (T5, BART, mBART, T5Gemma): sites name their stack; ``cross_attn_out`` is what the
decoder's cross-attention adds. Checked against the same edits written as plain PyTorch hooks
on modules named here by hand, outputs and gradients, on each padding side the model runs."""

import pytest
import torch

import reftgraph as rg
from oracle import padded
from reftgraph.arch.components.base import walk

LAYER = 1
BASE = ["the cat sat on it", "a dog"]
DECODER = torch.tensor([[0, 7, 9], [0, 8, 5]])      # teacher-forced decoder tokens, 3 per row

# per type: the encoder's and decoder's block lists; the modules whose outputs are attn_out and
# mlp_out in the encoder, attn_out, cross_attn_out and mlp_out in the decoder (the output is
# what is added: after T5's projections, before BART's norms); the block style
TYPES = {
    "t5": ("encoder.block", "decoder.block", {
        ("encoder", "attn_out"): "layer.0.SelfAttention.o", ("encoder", "mlp_out"): "layer.1.DenseReluDense.wo",
        ("decoder", "attn_out"): "layer.0.SelfAttention.o", ("decoder", "cross_attn_out"): "layer.1.EncDecAttention.o",
        ("decoder", "mlp_out"): "layer.2.DenseReluDense.wo"}, "inner_residual"),
    "bart": ("model.encoder.layers", "model.decoder.layers", {
        ("encoder", "attn_out"): "self_attn", ("encoder", "mlp_out"): "fc2", ("decoder", "attn_out"): "self_attn",
        ("decoder", "cross_attn_out"): "encoder_attn", ("decoder", "mlp_out"): "fc2"}, "post_ln"),
    "mbart": ("model.encoder.layers", "model.decoder.layers", {
        ("encoder", "attn_out"): "self_attn", ("encoder", "mlp_out"): "fc2", ("decoder", "attn_out"): "self_attn",
        ("decoder", "cross_attn_out"): "encoder_attn", ("decoder", "mlp_out"): "fc2"}, "sequential"),
    "t5gemma": ("model.encoder.layers", "model.decoder.layers", {
        ("encoder", "attn_out"): "post_self_attn_layernorm", ("encoder", "mlp_out"): "post_feedforward_layernorm",
        ("decoder", "attn_out"): "post_self_attn_layernorm", ("decoder", "cross_attn_out"): "post_cross_attn_layernorm",
        ("decoder", "mlp_out"): "post_feedforward_layernorm"}, "post_norm"),
}
SITES = [("encoder", "attn_out"), ("encoder", "mlp_out"), ("encoder", "resid_post"), ("decoder", "attn_out"),
         ("decoder", "cross_attn_out"), ("decoder", "mlp_out"), ("decoder", "resid_post"), ("decoder", "resid_pre")]


@pytest.fixture(scope="module")
def models():
    return {}


def model(models, model_type):
    if model_type not in models:
        models[model_type] = rg.models.tiny(model_type, seq2seq=True)
    return models[model_type]


def sides(model_type):     # (BART and mBART learn positions without position ids: right padding only)
    return [(model_type, side) for side in ("left", "right") if model_type in ("t5", "t5gemma") or side == "right"]


CASES = [case for t in TYPES for case in sides(t)]


def inputs_of(lm, side):
    """Teacher-forced inputs (encoder prompts padded on ``side``) and each row's real encoder tokens."""
    inputs, real = padded(lm, BASE, side)
    return {**inputs, "decoder_input_ids": DECODER.clone()}, real


def block(lm, model_type, stack, layer=LAYER):
    return walk(lm.hf, f"{TYPES[model_type][0 if stack == 'encoder' else 1]}.{layer}")


def plain(lm, inputs, hooks):
    """Logits with plain hooks ``[(module, "pre" | "post", fn)]`` installed."""
    handles = [m.register_forward_pre_hook(fn) if kind == "pre" else m.register_forward_hook(fn)
               for m, kind, fn in hooks]
    try:
        return lm.hf(**inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", list(TYPES))
def test_both_stacks_are_found_and_proven(models, model_type):
    lm = model(models, model_type)
    enc_layers, dec_layers, paths, style = TYPES[model_type]
    assert lm.arch.stack == "decoder" and lm.arch.stacks["encoder"].family.layers == enc_layers
    assert lm.arch.family.layers == dec_layers
    for (stack, component), path in paths.items():
        arch = lm.arch.stacks[stack]
        assert arch.blocks[LAYER].style == style
        assert arch.hook(component, LAYER).path == path and arch.hook(component, LAYER).stack == stack


@pytest.mark.parametrize("model_type,side", CASES)
def test_an_empty_graph_runs_the_model_as_itself(models, model_type, side):
    lm = model(models, model_type)
    inputs, _ = inputs_of(lm, side)
    got = rg.Graph().run(lm, inputs).logits
    assert torch.equal(got, plain(lm, inputs, []))


@pytest.mark.parametrize("model_type,side", CASES)
@pytest.mark.parametrize("stack,component", SITES)
def test_add_equals_plain_hooks_outputs_and_gradients(models, model_type, side, stack, component):
    lm = model(models, model_type)
    inputs, real = inputs_of(lm, side)
    at = 1      # the second real token of each row (encoder: of its prompt; decoder: of its tokens)
    vec = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(3))
    op = rg.Add(vec.clone(), trainable=True)
    g = rg.Graph()
    g.add(rg.Site(component, LAYER, positions=[at], stack=stack), op, name="add")
    got = g.run(lm, inputs).logits
    (grad,) = torch.autograd.grad(got.square().mean(), [op.vector])

    theirs = vec.clone().requires_grad_(True)
    rows = [r[at] for r in real] if stack == "encoder" else [at] * len(real)

    def added(t):
        t = t.clone()
        for i, p in enumerate(rows):
            t[i, p] = t[i, p] + theirs
        return t

    def post(module, args, out):
        return (added(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else added(out)

    def pre(module, args):
        return (added(args[0]),) + tuple(args[1:])

    here = block(lm, model_type, stack)
    if component == "resid_pre":
        hook = (here, "pre", pre)
    elif component == "resid_post":
        hook = (here, "post", post)
    else:
        hook = (walk(here, TYPES[model_type][2][stack, component]), "post", post)
    want = plain(lm, inputs, [hook])
    (want_grad,) = torch.autograd.grad(want.square().mean(), [theirs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, rg.Graph().run(lm, inputs).logits, atol=1e-4)


@pytest.mark.parametrize("model_type,side", CASES)
def test_collected_streams_are_each_stacks_block_outputs(models, model_type, side):
    lm = model(models, model_type)
    inputs, real = inputs_of(lm, side)
    g = rg.Graph()
    g.add(rg.Site("resid_post", LAYER, stack="encoder"), rg.Collect(), name="enc")
    g.add(rg.Site("resid_post", LAYER, stack="decoder"), rg.Collect(), name="dec")
    out = g.run(lm, inputs)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output[0] if isinstance(output, tuple) else output
        return hook
    plain(lm, inputs, [(block(lm, model_type, stack), "post", keep(stack)) for stack in ("encoder", "decoder")])
    for i, r in enumerate(real):
        torch.testing.assert_close(out["enc"][i, :len(r)], seen["encoder"][i, r], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["dec"], seen["decoder"], atol=1e-5, rtol=0)


def test_a_patch_reads_the_encoder_of_another_prompt(models):
    lm = model(models, "t5")
    base, source = ["the cat sat", "a dog ran"], ["the hat was", "a cow ate"]   # same lengths, row by row
    g = rg.Graph()
    g.add(rg.Site("resid_post", 0, positions="last", stack="encoder"), rg.Patch(source="source"), name="p")
    got = g.run(lm, base, sources={"source": source}).logits

    src, _ = padded(lm, source, "right")
    captured = {}

    def capture(module, args, out):
        captured["x"] = out[0] if isinstance(out, tuple) else out

    handle = block(lm, "t5", "encoder", 0).register_forward_hook(capture)
    lm.hf(**src, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    handle.remove()
    mine, real = padded(lm, base, "right")
    last = [r[-1] for r in real]

    def patch(module, args, out):
        x = (out[0] if isinstance(out, tuple) else out).clone()
        for i, p in enumerate(last):
            x[i, p] = captured["x"][i, p]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    want = plain(lm, {**mine, "decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)},
                 [(block(lm, "t5", "encoder", 0), "post", patch)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stacks_are_checked_before_any_forward(models):
    lm = model(models, "t5")
    for site, says in ((rg.Site("cross_attn_out", 0, stack="encoder"), "no cross-attention"),
                       (rg.Site("logits", stack="encoder"), "use stack='decoder'"),
                       (rg.Site("resid_pre", 9, stack="encoder"), "valid layers 0..3")):
        g = rg.Graph()
        g.add(site, rg.Collect(), name="n")
        with pytest.raises(rg.errors.SiteError, match=says):
            g.run(lm, BASE)
    g = rg.Graph()
    g.add(rg.Site("resid_pre", 0, stack="encoder"), rg.Collect(), name="n")
    with pytest.raises(rg.errors.SiteError, match="has one stack of blocks"):
        g.run(rg.models.tiny("llama"), BASE)
    with pytest.raises(rg.errors.SiteError, match="stack must be"):
        rg.Site("resid_pre", 0, stack="middle")


def test_a_site_with_a_stack_saves_and_prints_it():
    site = rg.Site("cross_attn_out", 1, positions="last", stack="decoder")
    assert str(site) == "decoder.cross_attn_out[1] pos=last"
    assert rg.Site.from_dict(site.to_dict()) == site
    assert "stack" not in rg.Site("resid_pre", 0).to_dict()


def test_generation_edits_the_encoder_once_and_steers_each_new_token(models):
    lm = model(models, "t5")
    prompts = ["hello there", "a"]
    v = 30 * torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    g = rg.Graph()
    g.add(rg.Site("resid_post", 1, positions="last", stack="encoder"), rg.Add(v), name="enc")
    g.add(rg.Site("mlp_out", 1, positions="generated"), rg.Add(v), name="dec")
    got = g.generate(lm, prompts, max_new_tokens=4)

    inputs, real = padded(lm, prompts, "right")
    calls = {"dec": 0}

    def encoder_edit(module, args, out):
        x = out[0].clone()
        for i, r in enumerate(real):
            x[i, r[-1]] += v
        return (x,) + tuple(out[1:])

    def decoder_edit(module, args, out):
        calls["dec"] += 1
        if calls["dec"] == 1:      # the decoder's first pass reads the start token: not a generated one
            return None
        out = out.clone()
        out[:, -1] += v
        return out

    handles = [block(lm, "t5", "encoder").register_forward_hook(encoder_edit),
               walk(block(lm, "t5", "decoder"), "layer.2.DenseReluDense.wo").register_forward_hook(decoder_edit)]
    try:
        want = lm.hf.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              max_new_tokens=4, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(got.ids, want)
    assert got.prompt_length == 1 and len(got.texts) == 2
    assert not torch.equal(got.ids, rg.Graph().generate(lm, prompts, max_new_tokens=4).ids)


def test_an_encoder_site_cannot_act_on_generated_tokens(models):
    g = rg.Graph()
    g.add(rg.Site("resid_post", 1, positions="generated", stack="encoder"), rg.Collect(), name="n")
    with pytest.raises(rg.errors.SiteError, match="reads the prompt once"):
        g.generate(model(models, "t5"), ["hi"], max_new_tokens=2)


def test_calls_that_read_one_stack_refuse_an_encoder_decoder(models):
    lm = model(models, "t5")
    data = rg.datasets.ioi(2)
    for call in (lambda: rg.patching.sweep(lm, data), lambda: rg.train(rg.Graph(), lm, ["a"]),
                 lambda: rg.circuits.edge_scores(lm, data)):
        with pytest.raises(rg.errors.SiteError, match="is an encoder-decoder"):
            call()


def test_the_encoder_decoder_page_runs():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "seq2seq.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 2
    scope = {}
    for code in blocks:
        exec(compile(code, "docs/seq2seq.md", "exec"), scope)
    assert scope["out"]["enc"].shape[-1] == scope["lm"].arch.d_model
