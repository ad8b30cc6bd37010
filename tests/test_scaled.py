"""Scaled residual additions (Granite's ``residual_multiplier``, MiniCPM3's depth scale):
``attn_out``/``mlp_out`` are what the block adds, the sub-layer's output times the scale each
real block holds. Checked against plain PyTorch hooks on the attention and MLP modules,
outputs and gradients, both padding sides."""

import math

import pytest
import torch

import reftgraph as rg
from oracle import add_at_last_token, logits_with_hook

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5
LAYER = 1
TYPES = {"granite": dict(residual_multiplier=0.5), "minicpm3": dict(scale_depth=1.4)}


@pytest.fixture(scope="module", params=list(TYPES))
def lm(request):
    return rg.models.tiny(request.param, **TYPES[request.param])


def scale(lm):
    config = lm.hf.config
    if config.model_type == "granite":
        return config.residual_multiplier
    return config.scale_depth / math.sqrt(config.num_hidden_layers)


def test_the_scale_is_each_real_blocks_own():
    deep = rg.models.tiny("minicpm3", num_hidden_layers=9, scale_depth=1.4)
    for block in deep.arch.blocks:
        assert block.style == "scaled"
        assert block.scales["attn_out"][1] == pytest.approx(1.4 / 3) == block.scales["mlp_out"][1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collected_values_add_up_with_the_scale(lm, side):
    g = rg.Graph()
    for c in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        g.add(rg.Site(c, layer=LAYER), rg.Collect(), name=c)
    out = g.run(lm, BASE, padding_side=side)
    torch.testing.assert_close(out["resid_pre"] + out["attn_out"], out["resid_mid"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["resid_mid"] + out["mlp_out"], out["resid_post"], atol=ATOL, rtol=0)
    seen = {}

    def keep(o, real):
        seen["a"] = (o[0] if isinstance(o, tuple) else o).detach().clone()
        return o
    with torch.no_grad():
        _, real = logits_with_hook(lm, BASE, side, lm.hf.model.layers[LAYER].self_attn, keep)
    for row, idx in enumerate(real):
        torch.testing.assert_close(out["attn_out"][row, :len(idx)], scale(lm) * seen["a"][row, idx], atol=ATOL, rtol=0)


@pytest.mark.parametrize("component,module", [("attn_out", "self_attn"), ("mlp_out", "mlp"), ("resid_mid", "self_attn")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, side, component, module):
    # the block adds scale * out: moving the stream by x is moving out by x / scale
    block = lm.hf.model.layers[LAYER]
    ours, grad, want, want_grad = add_at_last_token(lm, BASE, side, component, LAYER, getattr(block, module), scale(lm))
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_edges_refuse_scaled_blocks_naming_the_reason(lm):
    with pytest.raises(rg.SiteError, match="scaled"):
        rg.circuits.edges(lm)
