"""Post-LN blocks (BERT, RoBERTa, BART, Marian: the norm comes after the residual addition):
``attn_out``/``mlp_out`` are what the sub-layers add before the norms, ``resid_mid`` is the
first norm's output. Checked against the same edits written as plain PyTorch hooks on the
modules named here by hand, outputs and gradients, both padding sides."""

import pytest
import torch

import reftgraph as rg
from oracle import add_at_last_token, padded
from reftgraph.arch.components.base import walk

BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]   # the same lengths as BASE, row by row
ATOL = 1e-5
LAYER = 1

# per type: the block list, then the modules of attn_out, the norm after it (resid_mid),
# mlp_out, and the norm after it (resid_post); and the padding sides the model runs
TYPES = {
    "bert": ("bert.encoder.layer", "attention.output.dense", "attention.output.LayerNorm", "output.dense",
             "output.LayerNorm", ("left", "right")),
    "roberta": ("roberta.encoder.layer", "attention.output.dense", "attention.output.LayerNorm", "output.dense",
                "output.LayerNorm", ("left", "right")),
    "bart": ("model.decoder.layers", "self_attn", "self_attn_layer_norm", "fc2", "final_layer_norm", ("right",)),
}
CASES = [(t, side) for t, spec in TYPES.items() for side in spec[-1]]


@pytest.fixture(scope="module")
def models():
    return {}


def model(models, model_type):
    if model_type not in models:
        models[model_type] = rg.models.tiny(model_type)
    return models[model_type]


def module(lm, model_type, which):
    layers, *paths = TYPES[model_type][:5]
    return walk(lm.hf, f"{layers}.{LAYER}.{paths[which]}")


batch = padded


def plain(lm, prompts, side, hooks):
    """Logits of the model with plain forward hooks ``{module: fn(out, real) -> out}``."""
    inputs, real = batch(lm, prompts, side)
    handles = [m.register_forward_hook(lambda mod, a, out, fn=fn: fn(out, real)) for m, fn in hooks.items()]
    try:
        return lm.hf(**inputs).logits, real
    finally:
        for h in handles:
            h.remove()


def first(out):
    return out[0] if isinstance(out, tuple) else out


def with_first(out, new):
    return (new,) + out[1:] if isinstance(out, tuple) else new


@pytest.mark.parametrize("model_type", list(TYPES))
def test_the_components_are_the_modules_before_and_after_each_norm(models, model_type):
    lm = model(models, model_type)
    block = lm.arch.blocks[LAYER]
    _, attn, norm1, mlp, norm2, _ = TYPES[model_type]
    assert block.style == "post_ln"
    assert [lm.arch.hook(c, LAYER).path for c in ("attn_out", "resid_mid", "mlp_out")] == [attn, norm1, mlp]
    assert block.norms == {"attn_out": norm1, "mlp_out": norm2}


@pytest.mark.parametrize("model_type,side", CASES)
def test_collected_values_obey_the_post_ln_identities(models, model_type, side):
    lm = model(models, model_type)
    g = rg.Graph()
    for c in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        g.add(rg.Site(c, layer=LAYER), rg.Collect(), name=c)
    out = g.run(lm, BASE, padding_side=side)
    norm1, norm2 = module(lm, model_type, 1), module(lm, model_type, 3)
    with torch.no_grad():
        torch.testing.assert_close(out["resid_mid"], norm1(out["resid_pre"] + out["attn_out"]), atol=ATOL, rtol=0)
        torch.testing.assert_close(out["resid_post"], norm2(out["resid_mid"] + out["mlp_out"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type,side", CASES)
def test_adding_to_attn_out_moves_resid_mid_through_the_norm(models, model_type, side):
    lm = model(models, model_type)
    d = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    clean = rg.Graph()
    for c in ("resid_pre", "attn_out"):
        clean.add(rg.Site(c, layer=LAYER), rg.Collect(), name=c)
    before = clean.run(lm, BASE, padding_side=side)
    g = rg.Graph()
    g.add(rg.Site("attn_out", layer=LAYER), rg.Add(d), name="add")
    g.add(rg.Site("resid_mid", layer=LAYER), rg.Collect(), name="mid")   # (resid_mid runs after attn_out)
    out = g.run(lm, BASE, padding_side=side)
    with torch.no_grad():
        want = module(lm, model_type, 1)(before["resid_pre"] + before["attn_out"] + d)
    torch.testing.assert_close(out["mid"], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("component,which", [("attn_out", 0), ("mlp_out", 2), ("resid_mid", 1)])
@pytest.mark.parametrize("model_type,side", CASES)
def test_add_equals_the_plain_hook_outputs_and_gradients(models, model_type, side, component, which):
    lm = model(models, model_type)
    ours, grad, want, want_grad = add_at_last_token(lm, BASE, side, component, LAYER, module(lm, model_type, which))
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, rg.Graph().run(lm, BASE, padding_side=side).next_token_logits, atol=1e-4)


@pytest.mark.parametrize("model_type,side", CASES)
def test_patching_resid_mid_from_a_source_equals_the_plain_hook(models, model_type, side):
    lm = model(models, model_type)
    g = rg.Graph()
    g.add(rg.Site("resid_mid", layer=LAYER, positions=[0, -1]), rg.Patch("source"), name="p")
    ours = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side).next_token_logits
    seen = {}

    def keep(out, real):
        seen["out"] = first(out).detach().clone()
        return out
    with torch.no_grad():
        _, src_real = plain(lm, SOURCE, side, {module(lm, model_type, 1): keep})

    def edit(out, real):
        t = first(out).clone()
        for row, idx in enumerate(real):
            for p in (0, -1):
                t[row, idx[p]] = seen["out"][row, src_real[row][p]]
        return with_first(out, t)
    with torch.no_grad():
        logits, real = plain(lm, BASE, side, {module(lm, model_type, 1): edit})
    want = torch.stack([logits[row, idx[-1]] for row, idx in enumerate(real)])
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)


def test_bidirectional_heads_are_proven_with_keys_read_at_every_position(models):
    lm = model(models, "bert")        # BertLMHeadModel without is_decoder: attention both ways
    assert not lm.hf.config.is_decoder
    for c in ("head_out", "q", "k", "v", "attn_pattern", "q_in", "k_in", "v_in", "mlp_in", "mlp_act"):
        assert lm.arch.refusal(c, LAYER) is None, (c, lm.arch.refusal(c, LAYER))


def test_edges_refuse_post_ln_blocks_naming_the_reason(models):
    with pytest.raises(rg.SiteError, match="post_ln"):
        rg.circuits.edges(model(models, "bert"))
