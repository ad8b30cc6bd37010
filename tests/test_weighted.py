"""Weighted residual additions (``alpha * stream + beta * sublayer``): Beam's depth-scaled sum,
Ergo's residual gates, Dory's interpolation, MiniMax's alpha/beta factors, Gemma 4's sum before
its per-layer input and layer scalar, Falcon-H1's attention beside its Mamba mixer. ``attn_out``/``mlp_out`` are ``beta`` times the module
the block weighs; each beta below is written by hand from the transformers source, and the
edits are checked against plain PyTorch hooks on those modules, outputs and gradients, both
padding sides."""

import math

import pytest
import torch

import reftgraph as rg
from oracle import add_at_last_token, logits_with_hook

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5
LAYER = 1
OVERRIDES = {"minimax": dict(full_attn_beta_factor=1.3, linear_attn_beta_factor=0.8, mlp_beta_factor=0.6,
                             full_attn_alpha_factor=0.9, linear_attn_alpha_factor=1.1, mlp_alpha_factor=0.7),
             "falcon_h1": dict(attention_out_multiplier=0.7, ssm_out_multiplier=1.3)}
# the module whose output each block weighs: (attention's, the MLP's)
MODULES = {"beam": ("post_attention_layernorm", "post_feedforward_layernorm"),
           "ergo": ("post_attention_layernorm", "post_feedforward_layernorm"),
           "dory": ("post_attention_layernorm", "post_feedforward_layernorm"),
           "minimax": ("self_attn", "mlp"),
           "gemma4_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
           "falcon_h1": ("self_attn", "feed_forward")}


def _own_weights(hf) -> None:
    """Gates and rates away from their initial values (Ergo's are zeros: one sigmoid for all)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("residual_gate.weight", "lambda_1", "lambda_2")):
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=list(MODULES))
def lm(request):
    model = rg.models.tiny(request.param, **OVERRIDES.get(request.param, {}))
    _own_weights(model.hf)
    return rg.wrap(model.hf, model.tokenizer)     # (wrapped again: the weights are measured at wrap)


def beta(lm, component: str) -> torch.Tensor:
    """The weight of the sub-layer's addition at LAYER, from the transformers source."""
    block, kind = lm.hf.model.layers[LAYER], lm.hf.config.model_type
    attn = component == "attn_out"
    if kind == "beam":      # depth_scaled_residual_add: hidden * 1 / sqrt(idx)
        return torch.tensor(1 / math.sqrt(block.attn_residual_add_idx if attn else block.mlp_residual_add_idx))
    if kind == "ergo":      # ErgoResidualGate: sigmoid(weight) * hidden
        return (block.attention_residual_gate if attn else block.feedforward_residual_gate).weight.detach().sigmoid()
    if kind == "dory":      # hidden + rate * (update - hidden), rate = |lambda * lambda_scale|
        return ((block.lambda_1 if attn else block.lambda_2) * block.lambda_scale).detach().abs()
    if kind == "minimax":   # residual * alpha + hidden * beta
        return torch.tensor(block.attn_beta_factor if attn else block.mlp_beta_factor)
    if kind == "falcon_h1":  # residual + mamba * ssm_out_multiplier + attention * attn_out_multiplier; then the MLP
        return torch.tensor(block.attn_out_multiplier if attn else 1.0)
    return torch.tensor(1.0)   # gemma4_text: residual + norm(sub-layer), then the per-layer input and the scalar


def test_every_block_is_weighted_and_its_weights_are_measured_on_the_model_itself(lm):
    for block in lm.arch.blocks:
        assert block.style == "weighted"
        assert "resid_mid" in block.refused and "weighted" in block.refused["resid_mid"]
    for component in ("attn_out", "mlp_out"):
        got = lm.arch.blocks[LAYER].scales[component][1]
        torch.testing.assert_close(got, beta(lm, component).expand_as(got).float(), atol=1e-5, rtol=1e-5)


def test_weights_follow_the_models_own_parameters():
    """A wrap of the same config with other gate weights measures those (the tiny proof is only the form)."""
    model = rg.models.tiny("ergo")
    first = model.arch.blocks[LAYER].scales["attn_out"][1].clone()
    _own_weights(model.hf)
    again = rg.wrap(model.hf, model.tokenizer).arch.blocks[LAYER].scales["attn_out"][1]
    assert torch.allclose(first, torch.full_like(first, 0.5))          # sigmoid(0): the initial gates
    torch.testing.assert_close(again, model.hf.model.layers[LAYER].attention_residual_gate.weight.detach().sigmoid())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("component", ["attn_out", "mlp_out"])
def test_collect_is_beta_times_the_weighed_module(lm, side, component):
    g = rg.Graph()
    g.add(rg.Site(component, layer=LAYER), rg.Collect(), name="c")
    got = g.run(lm, BASE, padding_side=side)["c"]
    seen = {}

    def keep(o, real):
        seen["x"] = (o[0] if isinstance(o, tuple) else o).detach().clone()
        return o
    module = getattr(lm.hf.model.layers[LAYER], MODULES[lm.hf.config.model_type][component == "mlp_out"])
    with torch.no_grad():
        _, real = logits_with_hook(lm, BASE, side, module, keep)
    for row, idx in enumerate(real):
        torch.testing.assert_close(got[row, :len(idx)], beta(lm, component) * seen["x"][row, idx], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("component", ["attn_out", "mlp_out"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, side, component):
    module = getattr(lm.hf.model.layers[LAYER], MODULES[lm.hf.config.model_type][component == "mlp_out"])
    # the block adds beta * module: moving the sum by x is moving the module's output by x / beta
    ours, grad, want, want_grad = add_at_last_token(lm, BASE, side, component, LAYER, module, beta(lm, component))
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)


def test_edges_refuse_weighted_blocks_naming_the_reason(lm):
    with pytest.raises(rg.SiteError, match="weighted"):
        rg.circuits.edges(lm)


def test_a_model_without_weights_refuses_what_it_cannot_measure():
    from transformers import AutoModelForCausalLM

    from reftgraph.arch.structure import Arch

    config = rg.models.tiny("ergo").hf.config
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    arch = Arch.of(empty)      # (how a remote model is proven: its architecture without its weights)
    assert "meta" in arch.refusal("attn_out", LAYER) and "meta" in arch.refusal("mlp_out", LAYER)
    assert arch.refusal("resid_pre", LAYER) is None


def test_weights_measured_in_bfloat16_are_those_of_float32():
    """The real fit adds as much as the sum itself, so half-precision rounding stays small beside it."""
    for kind in ("beam", "dory", "minimax"):
        full = rg.models.tiny(kind, **OVERRIDES.get(kind, {})).arch.blocks[LAYER].scales
        half = rg.models.tiny(kind, dtype=torch.bfloat16, **OVERRIDES.get(kind, {})).arch.blocks[LAYER].scales
        for component in ("attn_out", "mlp_out"):
            torch.testing.assert_close(half[component][1], full[component][1], rtol=1e-2, atol=1e-3)
