"""A block that adds its MLP's output together with a module beside it (GraniteMoeHybrid,
Granite 4.0: ``moe(x) + shared_mlp(x)``, both times the block's ``residual_multiplier``):
``mlp_out`` is the scale times their sum, read at the operation inside the block's forward
that adds them; its Mamba layers' ``mixer_out`` is the mixer's output times the same scale.
Checked against plain PyTorch hooks on the modules, outputs and gradients, both padding sides,
with the default multiplier (1: sequential blocks) and another (scaled blocks)."""

import pytest
import torch

import reftgraph as rg
from oracle import add_at_last_token, logits_with_hook

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5
ATTENTION, MAMBA = 2, 0     # (the tiny instance's layer kinds)


@pytest.fixture(scope="module", params=[1.0, 0.3], ids=["sequential", "scaled"])
def lm(request):
    return rg.models.tiny("granitemoehybrid", residual_multiplier=request.param)


def c(lm):
    return lm.hf.config.residual_multiplier


def test_the_sum_is_found_inside_the_block_on_every_layer(lm):
    for layer, block in enumerate(lm.arch.blocks):
        assert block.style == ("sequential" if c(lm) == 1 else "scaled")
        hook = lm.arch.hook("mlp_out", layer)
        assert (hook.path, hook.io, len(hook.inner)) == ("", "output", 1)
        assert lm.arch.refusal("mlp_in", layer) is None
    assert lm.arch.refusal("attn_out", ATTENTION) is None and lm.arch.refusal("mixer_out", MAMBA) is None
    if c(lm) != 1:
        assert lm.arch.blocks[MAMBA].scales["mixer_out"] == ("residual_multiplier", c(lm))


@pytest.mark.parametrize("layer", [ATTENTION, MAMBA])
@pytest.mark.parametrize("side", ["left", "right"])
def test_collected_mlp_out_is_the_scaled_sum_of_both_modules(lm, side, layer):
    g = rg.Graph()
    for name in ("resid_pre", "resid_mid", "mlp_in", "mlp_out", "resid_post"):   # (hooks before the sum, and after)
        g.add(rg.Site(name, layer=layer), rg.Collect(), name=name)
    out = g.run(lm, BASE, padding_side=side)
    torch.testing.assert_close(out["resid_mid"] + out["mlp_out"], out["resid_post"], atol=ATOL, rtol=0)
    block, seen = lm.hf.model.layers[layer], {}

    def keep(name):
        def fn(o, real):
            seen[name] = o.detach().clone()
            return o
        return fn
    with torch.no_grad():
        logits_with_hook(lm, BASE, side, block.block_sparse_moe, keep("moe"))
        _, real = logits_with_hook(lm, BASE, side, block.shared_mlp, keep("shared"))
    for row, idx in enumerate(real):
        want = c(lm) * (seen["moe"][row, idx] + seen["shared"][row, idx])
        torch.testing.assert_close(out["mlp_out"][row, :len(idx)], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("component,layer,module", [("mlp_out", ATTENTION, "block_sparse_moe"),
                                                     ("mlp_out", MAMBA, "shared_mlp"),
                                                     ("mixer_out", MAMBA, "mamba"),
                                                     ("attn_out", ATTENTION, "self_attn")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, side, component, layer, module):
    # the block adds c * (moe + shared): moving the stream by x is moving either module's output by x / c
    block = lm.hf.model.layers[layer]
    ours, grad, want, want_grad = add_at_last_token(lm, BASE, side, component, layer, getattr(block, module), c(lm))
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_generation_steers_through_the_sum(lm):
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=ATTENTION, positions="all"), rg.Add(torch.ones(lm.arch.d_model) * 5.0), name="a")
    plain = rg.Graph().generate(lm, BASE[:1], max_new_tokens=4, do_sample=False).new_ids
    steered = g.generate(lm, BASE[:1], max_new_tokens=4, do_sample=False).new_ids
    assert not torch.equal(plain, steered)


def test_remote_runs_reach_the_sum(lm):
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=ATTENTION), rg.Collect(), name="m")
    g.add(rg.Site("mlp_out", layer=MAMBA, positions="last"), rg.Add(torch.ones(lm.arch.d_model)), name="a")
    here, there = g.run(lm, BASE, grad=False), g.run(lm, BASE, remote="local")
    torch.testing.assert_close(there["m"], here["m"], atol=0, rtol=0)
    torch.testing.assert_close(there.logits, here.logits, atol=0, rtol=0)
