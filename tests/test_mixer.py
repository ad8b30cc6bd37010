"""``mixer_out`` (what a state-space block's mixer adds to the stream) against the same edits
written as plain PyTorch hooks on the mixer module, outputs and gradients, both padding sides,
on tiny Mamba, Mamba-2 and Falcon-Mamba; and its refusals elsewhere."""

import pytest
import torch

import reftgraph as rg
from oracle import add_at_last_token, padded

BASE = ["the cat sat on it", "a dog"]
SOURCE = ["my hat was on top", "a cow"]   # the same lengths as BASE, row by row
ATOL = 1e-5


@pytest.fixture(scope="module", params=["mamba", "mamba2", "falcon_mamba"])
def lm(request):
    return rg.models.tiny(request.param)


batch = padded


def plain(lm, prompts, side, edit, layer=1):
    """Logits with ``edit(out, real)`` applied to the mixer's output of ``layer`` (plain hook);
    ``real``: each row's real token indices."""
    inputs, real = batch(lm, prompts, side)
    mixer = lm.hf.backbone.layers[layer].mixer
    handle = mixer.register_forward_hook(lambda m, a, out: edit(out, real))
    try:
        return lm.hf(**inputs).logits, real
    finally:
        handle.remove()


def mixer_outputs(lm, prompts, side, layer=1):
    seen = {}

    def keep(out, real):
        seen["out"] = out.detach().clone()
        return out
    with torch.no_grad():
        plain(lm, prompts, side, keep, layer)
    return seen["out"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collect_is_the_mixers_output(lm, side):
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=1), rg.Collect(), name="c")
    out = g.run(lm, BASE, padding_side=side)
    want, (_, real) = mixer_outputs(lm, BASE, side), batch(lm, BASE, side)
    for row, idx in enumerate(real):
        torch.testing.assert_close(out["c"][row, :len(idx)], want[row, idx], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, side):
    d = lm.arch.d_model
    vector = torch.randn(d, generator=torch.Generator().manual_seed(0))
    op = rg.Add(vector.clone(), scale=1.5, trainable=True)
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=1, positions="last"), op, name="a")
    out = g.run(lm, BASE, padding_side=side)
    ours = out.next_token_logits
    (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])

    v = vector.clone().requires_grad_(True)

    def edit(t, real):
        t = t.clone()
        for row, idx in enumerate(real):
            t[row, idx[-1]] = t[row, idx[-1]] + 1.5 * v
        return t
    logits, real = plain(lm, BASE, side, edit)
    want = torch.stack([logits[row, idx[-1]] for row, idx in enumerate(real)])
    (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, rg.Graph().run(lm, BASE, padding_side=side).next_token_logits, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_patch_from_a_source_equals_the_plain_hook(lm, side):
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=1, positions=[0, -1]), rg.Patch("source"), name="p")
    ours = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side).next_token_logits
    source, (_, src_real) = mixer_outputs(lm, SOURCE, side), batch(lm, SOURCE, side)

    def edit(t, real):
        t = t.clone()
        for row, idx in enumerate(real):
            for p in (0, -1):
                t[row, idx[p]] = source[row, src_real[row][p]]
        return t
    with torch.no_grad():
        logits, real = plain(lm, BASE, side, edit)
    want = torch.stack([logits[row, idx[-1]] for row, idx in enumerate(real)])
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)


def test_loreft_at_mixer_out_trains():
    lm = rg.models.tiny("mamba")
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=2, positions="last"), rg.LoReFT(width=lm.arch.d_model, rank=2, seed=0), name="r")
    history = rg.train(g, lm, rg.data.PromptResponse([("ab", "cd"), ("ef", "gh")]), epochs=4, lr=5e-2,
                       progress=False)
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]


def test_refused_where_the_block_has_attention_and_on_state_space_blocks_attention_is_refused():
    llama, mamba = rg.models.tiny("llama"), rg.models.tiny("mamba")
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=0), rg.Collect(), name="m")
    with pytest.raises(rg.SiteError, match="refuses mixer_out at layer 0: this block has attention, not a sequence"):
        g.run(llama, ["ab"])
    g = rg.Graph()
    g.add(rg.Site("attn_out", layer=0), rg.Collect(), name="a")
    with pytest.raises(rg.SiteError, match="refuses attn_out at layer 0"):
        g.run(mamba, ["ab"])


def test_a_hybrid_has_mixer_out_on_its_mixer_layers_only():
    hybrid = rg.models.tiny("zamba2")
    layers = [i for i in range(hybrid.arch.n_layers) if hybrid.arch.refusal("mixer_out", i) is None]
    others = [i for i in range(hybrid.arch.n_layers) if i not in layers]
    assert layers and others
    assert "it exists on layers" in hybrid.arch.refusal("mixer_out", others[0])
    g = rg.Graph()
    g.add(rg.Site("mixer_out", layer=layers[0], positions="last"), rg.Collect(), name="m")
    assert g.run(hybrid, ["ab c"])["m"].shape[-1] == hybrid.arch.d_model


# blocks whose mixer comes before an MLP: (model type, block list, mixer module, a layer with one)
MIXER_MLP = [("xlstm", "backbone.blocks", "mlstm_layer", 1), ("recurrent_gemma", "model.layers", "temporal_block", 0),
             ("jamba", "model.layers", "mamba", 1)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type,layers,mixer,layer", MIXER_MLP)
def test_a_mixer_before_an_mlp_adds_to_resid_mid_as_the_plain_hook_says(model_type, layers, mixer, layer, side):
    from reftgraph.arch.components.base import walk

    lm = rg.models.tiny(model_type)
    module = walk(lm.hf, f"{layers}.{layer}.{mixer}")
    g = rg.Graph()
    if side in lm.arch.padding:      # a recurrence that ignores the mask: that side is refused, saying so
        with pytest.raises(rg.DataError, match=f"padded on the {side}"):
            g.run(lm, BASE, padding_side=side)
        return
    for c in ("resid_pre", "mixer_out", "resid_mid"):
        g.add(rg.Site(c, layer=layer), rg.Collect(), name=c)
    out = g.run(lm, BASE, padding_side=side)
    torch.testing.assert_close(out["resid_pre"] + out["mixer_out"], out["resid_mid"], atol=ATOL, rtol=0)

    ours, grad, want, want_grad = add_at_last_token(lm, BASE, side, "mixer_out", layer, module, scale=1.0, seed=0)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
