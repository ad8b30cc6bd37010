"""Attribution patching against plain-hook autograd references and exact sweeps."""

import copy

import pytest
import torch
from torch import nn

import reftgraph as rg
from reftgraph.errors import DataError, SiteError
from oracle import PATHS

BASE = ["ab c d", "xy zw", "hello q"]
SOURCE = ["ab d c", "xy wz", "jello r"]
DATA = rg.patching.Counterfactual(BASE, SOURCE, correct=["c", "z", "q"], wrong=["d", "w", "r"])


def _module(hf, path):
    for part in path.split("."):
        hf = hf[int(part)] if part.isdigit() else getattr(hf, part)
    return hf


def reference(lm, family, component, layer, positions):
    """``(a_source - a_base) . dM/da`` with plain hooks, one prompt at a time (no padding),
    logit_diff as the metric; returns the mean over rows, per position ``[k]`` or summed."""
    hf, tok, paths = lm.hf, lm.tokenizer, PATHS[family]
    block = _module(hf, paths["layers"])[layer]
    target = {"resid_post": block, "mlp_out": _module(block, paths["mlp"]),
              "head_out": _module(block, paths["o"])}[component]
    pre = component == "head_out"
    total = 0
    for base, source, good, bad in zip(DATA.base, DATA.source, DATA.correct, DATA.wrong):
        seen = {}

        def hook(module, args, out=None):
            h = args[0] if pre else (out[0] if isinstance(out, tuple) else out)
            seen["value"] = h.detach()
            if "delta" in seen:
                h = h + seen["delta"]
                return (h,) + tuple(args[1:]) if pre else ((h,) + tuple(out[1:]) if isinstance(out, tuple) else h)

        handle = target.register_forward_pre_hook(hook) if pre else target.register_forward_hook(hook)
        try:
            ids = tok(source, return_tensors="pt")["input_ids"]
            hf(input_ids=ids)
            src = seen.pop("value")
            ids = tok(base, return_tensors="pt")["input_ids"]
            seen["delta"] = torch.zeros_like(src, requires_grad=True)
            logits = hf(input_ids=ids).logits[0, -1]
            a, b = tok(good, add_special_tokens=False)["input_ids"][0], tok(bad, add_special_tokens=False)["input_ids"][0]
            (logits[a] - logits[b]).backward()
        finally:
            handle.remove()
        prod = ((src - seen["value"]) * seen["delta"].grad)[0].sum(-1)        # [S] (or [S, d] -> [S])
        if positions == "all":
            total = total + prod.sum(0)
        else:
            total = total + prod[list(positions)]
    return total / len(DATA)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attribute_equals_plain_hook_linearisation(family, side):
    lm = rg.models.tiny(family)
    lm.tokenizer.padding_side = side
    est = rg.patching.attribute(lm, DATA, "resid_post", positions=[-2, -1], layers=[0])
    ref = reference(lm, family, "resid_post", 0, (-2, -1))
    assert est["estimate"].values == pytest.approx(ref.tolist(), abs=1e-5)
    mlp = rg.patching.attribute(lm, DATA, "mlp_out", layers=[0])["estimate"].item()
    assert mlp == pytest.approx(float(reference(lm, family, "mlp_out", 0, "all")), abs=1e-5)


def test_attribute_heads_equal_plain_hook_linearisation():
    lm = rg.models.tiny("llama")
    est = rg.patching.attribute(lm, DATA, "head_out", layers=[1])
    hf = lm.hf
    o = hf.model.layers[1].self_attn.o_proj
    total, absolute = torch.zeros(lm.arch.n_heads), torch.zeros(lm.arch.n_heads)
    for base, source, good, bad in zip(DATA.base, DATA.source, DATA.correct, DATA.wrong):
        seen = {}

        def hook(module, args):
            seen.setdefault("values", []).append(args[0].detach())
            if "delta" in seen:
                return (args[0] + seen["delta"],)

        handle = o.register_forward_pre_hook(hook)
        hf(input_ids=lm.tokenizer(source, return_tensors="pt")["input_ids"])
        seen["delta"] = torch.zeros_like(seen["values"][0], requires_grad=True)
        logits = hf(input_ids=lm.tokenizer(base, return_tensors="pt")["input_ids"]).logits[0, -1]
        handle.remove()
        ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (good, bad)]
        (logits[ids[0]] - logits[ids[1]]).backward()
        src, value = seen["values"]
        prod = ((src - value) * seen["delta"].grad)[0]                       # [S, H * dh]
        row = prod.view(prod.shape[0], lm.arch.n_heads, -1).sum((0, 2))
        total, absolute = total + row, absolute + row.abs()
    assert est["estimate"].values == pytest.approx((total / len(DATA)).tolist(), abs=1e-5)
    assert est["mean_abs"].values == pytest.approx((absolute / len(DATA)).tolist(), abs=1e-5)
    assert (est["mean_abs"] > est["estimate"].abs() + 1e-6).any()        # some heads change sign row by row


def linear_top():
    """A tiny Llama whose last layer reaches the logits linearly: no final norm, last MLP zero."""
    lm = rg.models.tiny("llama", seed=1)
    hf = copy.deepcopy(lm.hf)
    hf.model.norm = nn.Identity()
    with torch.no_grad():
        hf.model.layers[-1].mlp.down_proj.weight.zero_()
        attn = hf.model.layers[-1].self_attn
        for proj, scale in ((attn.q_proj, 30), (attn.k_proj, 30), (attn.v_proj, 10), (attn.o_proj, 10)):
            proj.weight.mul_(scale)            # sharp attention, far from linear in q and k; large effects
    return rg.wrap(hf, lm.tokenizer, name="linear-top")


@pytest.mark.parametrize("side", ["left", "right"])
def test_attribute_equals_sweep_where_the_metric_is_linear_in_the_site(side):
    lm = linear_top()
    lm.tokenizer.padding_side = side
    last = lm.arch.n_layers - 1
    for component, positions in [("resid_post", [-3, -1]), ("attn_out", None), ("head_out", None),
                                 ("v", None), ("head_out", [-2, -1]), ("mlp_act", [-1])]:
        est = rg.patching.attribute(lm, DATA, component, layers=[last], positions=positions)
        exact = rg.patching.sweep(lm, DATA, component, layers=[last], positions=positions)
        assert est["value"].values == pytest.approx(exact["value"].values, abs=2e-5), component
        assert est["restoration"].values == pytest.approx(exact["restoration"].values, abs=1e-3), component


def test_qk_fix_equals_exact_patching_of_single_queries_and_keys():
    lm = linear_top()
    last = lm.arch.n_layers - 1
    for component in ("q", "k"):
        exact = rg.patching.sweep(lm, DATA, component, layers=[last], positions=[-3, -2, -1])
        fixed = rg.patching.attribute(lm, DATA, component, layers=[last], positions=[-3, -2, -1])
        plain = rg.patching.attribute(lm, DATA, component, layers=[last], positions=[-3, -2, -1], qk_fix=False)
        assert fixed["value"].values == pytest.approx(exact["value"].values, abs=2e-5), component
        effect = (exact["value"] - exact.attrs["base"]).abs()
        assert effect.max() > 1e-3                                        # patching keys moves the metric
        if component == "k":  # softmax is not linear: plain AtP misses what the QK fix gets
            assert (plain["estimate"] - (exact["value"] - exact.attrs["base"])).abs().max() > 10 * 2e-5
    # keys at all positions: the sum of single-key effects (prompts of 4 tokens)
    even = rg.patching.Counterfactual(["ab c", "xy z"], ["pq d", "uv w"], correct=["c", "z"], wrong=["d", "w"])
    fixed = rg.patching.attribute(lm, even, "k", layers=[last], positions="all")
    each = rg.patching.attribute(lm, even, "k", layers=[last], positions=[0, 1, 2, 3])
    assert fixed["estimate"].values == pytest.approx(each.groupby("head")["estimate"].sum().values, abs=1e-6)


def test_grad_drop_and_integrated_gradients():
    lm = linear_top()
    last = lm.arch.n_layers - 1
    est = rg.patching.attribute(lm, DATA, "mlp_out", grad_drop=True)
    assert (est["grad_drop"] >= 0).all()
    # the last layer's mlp_out reaches the logits through no later layer: only dropping its own
    # layer changes its gradient (to zero), so the L - 1 others each give |estimate|
    top = est[est.layer == last]
    assert top["grad_drop"].item() == pytest.approx(abs(top["estimate"].item()), rel=1e-5)
    # where the gradient is the same all the way between the runs, IG is the plain estimate
    ig = rg.patching.attribute(lm, DATA, ["head_out", "attn_out"], layers=[last], ig_steps=3)
    plain = rg.patching.attribute(lm, DATA, ["head_out", "attn_out"], layers=[last])
    assert ig["estimate"].values == pytest.approx(plain["estimate"].values, abs=1e-5)
    assert ig.attrs["method"] == "AtP+QK+IG3"


def test_attribute_bad_input_fails_before_any_forward(monkeypatch):
    lm = rg.models.tiny("llama")

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(lm.hf, "forward", no_forward)
    uneven = rg.patching.Counterfactual(["ab c", "xy"], ["ab", "xyz w"], correct=["c", "z"], wrong=["d", "w"])
    with pytest.raises(DataError, match="row 0 have 4 and 2 tokens"):
        rg.patching.attribute(lm, uneven, "head_out")
    with pytest.raises(DataError, match="equal length"):
        rg.patching.attribute(lm, uneven, "resid_pre", positions=[-1], ig_steps=2)
    with pytest.raises(DataError, match="does not depend on them"):
        rg.patching.attribute(lm, DATA, "mlp_out", metric=lambda logits, ref: torch.ones(len(logits)))
    with pytest.raises(DataError, match="one value per row"):
        rg.patching.attribute(lm, DATA, "mlp_out", metric=lambda logits, ref: logits.sum())
    with pytest.raises(DataError, match="not both"):
        rg.patching.attribute(lm, DATA, "mlp_out", grad_drop=True, ig_steps=2)
    with pytest.raises(SiteError, match="layer 5 out of range; valid layers 0..1"):
        rg.patching.attribute(lm, DATA, "mlp_out", layers=[5])
    with pytest.raises(SiteError, match="head 9 out of range; valid heads 0..3"):
        rg.patching.attribute(lm, DATA, "head_out", heads=[9])
    parallel = rg.models.tiny("gptj")
    monkeypatch.setattr(parallel.hf, "forward", no_forward)
    with pytest.raises(SiteError, match="resid_mid"):
        rg.patching.attribute(parallel, DATA, "resid_mid", positions=[-1])


def test_integrated_gradients_are_complete():
    # IG at the block-0 input, all positions: the estimate sums to the metric's whole change
    lm = rg.models.tiny("llama", num_hidden_layers=3)
    data = rg.patching.Counterfactual(["ab c d", "xy z w"], ["pq d c", "uv w z"], correct=["c", "z"], wrong=["d", "w"])
    plain = rg.patching.attribute(lm, data, "resid_pre", layers=[0], positions="all")
    ig = rg.patching.attribute(lm, data, "resid_pre", layers=[0], positions="all", ig_steps=40)
    change = ig.attrs["source"] - ig.attrs["base"]
    assert ig["estimate"].item() == pytest.approx(change, rel=2e-3)
    assert abs(plain["estimate"].item() - change) > 0.1 * abs(change)     # the plain gradient is far off here
