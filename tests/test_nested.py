"""Sub-layers the resolver finds below the block's children: DBRX's attention inside
``norm_attn_norm`` (norm, attention, norm, the MLP's norm nested there too) and
RoBERTa-PreLayerNorm's attention that adds its own residual. ``attn_out``, ``mlp_out`` and one
head's ``head_out`` against the same additions as plain hooks on modules named by hand from the
transformers source; outputs and gradients, each padding side the model runs."""

import pytest
import torch

import reftgraph as rg
from oracle import last_logits_with, padded

BASE = ["the cat sat on it", "a dog"]
ATOL = 1e-5

# type -> (the block list, {component: (module path in the block, "output" | "input")})
HAND = {"dbrx": ("transformer.blocks", {"attn_out": ("norm_attn_norm.attn", "output"), "mlp_out": ("ffn", "output"),
                                        "head_out": ("norm_attn_norm.attn.out_proj", "input")}),
        "roberta-prelayernorm": ("roberta_prelayernorm.encoder.layer",
                                 {"attn_out": ("attention.output.dense", "output"), "mlp_out": ("output.dense", "output"),
                                  "head_out": ("attention.output.dense", "input")})}


@pytest.fixture(scope="module", params=sorted(HAND))
def lm(request):
    return rg.models.tiny(request.param)


def _module(lm, layer, path):
    blocks, _ = HAND[lm.hf.config.model_type]
    return lm.hf.get_submodule(blocks)[layer].get_submodule(path)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _with_first(value, new):
    return (new,) + tuple(value[1:]) if isinstance(value, tuple) else new


def test_the_nested_modules_are_found(lm):
    paths = HAND[lm.hf.config.model_type][1]
    assert lm.arch.hook("attn_out", 1).path == paths["attn_out"][0]
    assert lm.arch.hook("mlp_out", 1).path == paths["mlp_out"][0]
    assert lm.arch.table()["resid_mid"] == "verified"


@pytest.mark.parametrize("component", ["attn_out", "mlp_out", "head_out"])
def test_add_equals_the_plain_hook_outputs_and_gradients(lm, component):
    path, io = HAND[lm.hf.config.model_type][1][component]
    head, width = (1, lm.arch.width("head_out", 1)) if component == "head_out" else (None, lm.arch.d_model)
    vector = torch.randn(width, generator=torch.Generator().manual_seed(0))
    sides = [s for s in ("left", "right") if s not in lm.arch.padding]
    assert sides, lm.arch.padding
    for side in sides:
        op = rg.Add(vector.clone(), scale=1.5, trainable=True)
        g = rg.Graph()
        g.add(rg.Site(component, layer=1, positions="last", head=head), op, name="a")
        ours = g.run(lm, BASE, padding_side=side).next_token_logits
        (grad,) = torch.autograd.grad(ours.square().sum(), [op.vector])

        v = vector.clone().requires_grad_(True)
        inputs, real = padded(lm, BASE, side)

        def edit(t):
            t = t.clone()
            for row, idx in enumerate(real):
                if head is None:
                    t[row, idx[-1]] = t[row, idx[-1]] + 1.5 * v
                else:     # head h's slice of the output projection's input
                    t[row, idx[-1], head * width:(head + 1) * width] += 1.5 * v
            return t
        module = _module(lm, 1, path)
        handle = (module.register_forward_hook(lambda m, a, out: _with_first(out, edit(_first(out)))) if io == "output"
                  else module.register_forward_pre_hook(lambda m, a: (edit(a[0]),) + tuple(a[1:])))
        want = last_logits_with(lm, inputs, real, handle)
        (want_grad,) = torch.autograd.grad(want.square().sum(), [v])
        torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(grad, want_grad, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours, rg.Graph().run(lm, BASE, padding_side=side).next_token_logits, atol=1e-4)
