"""Importing pyreft checkpoints: hand-written in pyreft's exact on-disk layout, checked against
pyreft's formulas computed from the saved tensors and against plain hooks on the HF model.

Layout (pyvene ``IntervenableModel.save``, used by ``ReftModel.save``): ``config.json`` from
``IntervenableConfig.save_pretrained`` (``representations`` serialised as lists in
``RepresentationConfig`` field order, ``intervention_types`` as ``str(type(intervention))``,
``sorted_keys``, ``intervention_dimensions``...), and ``intkey_{key}.bin`` =
``torch.save(intervention.state_dict())`` per key. The ``Pyreft*`` classes below mirror
pyreft/interventions.py (module structure, state_dict and forward) without importing pyreft.
"""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import reftgraph as rg
from reftgraph.files.pyreft import from_pyreft

D, RANK = 32, 4
PROMPTS = ["hello world", "a cat sat on it", "hi there you"]


# -- pyreft's modules, as in pyreft/interventions.py --------------------------------------
class LowRankRotateLayer(nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, m))
        nn.init.orthogonal_(self.weight)

    def forward(self, x):
        return x @ self.weight


class PyreftBase(nn.Module):
    """pyvene's Intervention registers these two buffers; its default state_dict saves them."""

    def __init__(self, d=D, r=RANK):
        super().__init__()
        self.register_buffer("embed_dim", torch.tensor(d))
        self.register_buffer("interchange_dim", torch.tensor(d))


def rotated(d, r):
    return nn.utils.parametrizations.orthogonal(LowRankRotateLayer(d, r))


class LoreftIntervention(PyreftBase):
    def __init__(self, d=D, r=RANK):
        super().__init__(d, r)
        self.rotate_layer, self.learned_source = rotated(d, r), nn.Linear(d, r)

    def forward(self, h):
        return h + (self.learned_source(h) - self.rotate_layer(h)) @ self.rotate_layer.weight.T

    def state_dict(self, *args, **kwargs):  # pyreft's override: W, b and the materialised R^T
        sd = OrderedDict(self.learned_source.state_dict())
        sd["rotate_layer"] = self.rotate_layer.weight.data
        return sd


class NoreftIntervention(PyreftBase):
    def __init__(self, d=D, r=RANK, add_bias=True):
        super().__init__(d, r)
        self.proj_layer, self.learned_source = nn.Linear(d, r, bias=add_bias), nn.Linear(d, r)

    def forward(self, h):
        return h + (self.learned_source(h) - self.proj_layer(h)) @ self.proj_layer.weight


class DireftIntervention(PyreftBase):
    def __init__(self, d=D, r=RANK):
        super().__init__(d, r)
        self.rotate_layer, self.learned_source = rotated(d, r), nn.Linear(d, r)

    def forward(self, h):
        return h + self.learned_source(h) @ self.rotate_layer.weight.T


class NodireftIntervention(NoreftIntervention):
    def forward(self, h):
        return h + self.learned_source(h) @ self.proj_layer.weight


class ConsreftIntervention(PyreftBase):
    def __init__(self, d=D, r=RANK):
        super().__init__(d, r)
        self.rotate_layer, self.learned_source = rotated(d, r), nn.Parameter(torch.rand(r))

    def forward(self, h):
        return h + (self.learned_source - self.rotate_layer(h)) @ self.rotate_layer.weight.T


class LobireftIntervention(ConsreftIntervention):
    def forward(self, h):
        return h + self.learned_source @ self.rotate_layer.weight.T


PYREFT = {c.__name__: c for c in (LoreftIntervention, NoreftIntervention, DireftIntervention,
                                  NodireftIntervention, ConsreftIntervention, LobireftIntervention)}
OURS = {"LoreftIntervention": rg.LoReFT, "NoreftIntervention": rg.NoReFT, "DireftIntervention": rg.DiReFT,
        "NodireftIntervention": rg.NoDiReFT, "ConsreftIntervention": rg.ConsReFT,
        "LobireftIntervention": rg.LoBiReFT}


def trained(cls_name, seed):
    """A pyreft intervention with every parameter moved off its initial value (as after training)."""
    torch.manual_seed(seed)
    m = PYREFT[cls_name]()
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = 0.3 * torch.randn_like(p)
            # torch's householder map reads only the strict lower triangle of `original` (its
            # diagonal holds column signs and gets no gradient), so training moves only that
            p.add_(noise.tril(-1) if name.endswith("original") else noise)
    return m


# -- pyvene's save ------------------------------------------------------------------------
def key_of(layer, component, n, old=False):
    if old:  # pyvene < 0.1.7
        return f"layer.{layer}.comp.{component}.unit.pos.nunit.1#{n}"
    return f"layer_{layer}_comp_{component}_unit_pos_nunit_1#{n}"


def save_like_pyreft(path, interventions, layers, component="block_output", old=False):
    """What ``ReftModel.save(path)`` writes for ``representations=[{"layer": l, "component": ...,
    "low_rank_dimension": 4, "intervention": ...} for l in layers]``."""
    path.mkdir(parents=True, exist_ok=True)
    keys, seen = [], {}
    for layer in layers:
        keys.append(key_of(layer, component, seen.get(layer, 0), old))
        seen[layer] = seen.get(layer, 0) + 1
    # RepresentationConfig(layer, component, unit, max_number_of_units, low_rank_dimension,
    # intervention_type, intervention, subspace_partition, group_key, intervention_link_key,
    # moe_key, source_representation, hidden_source_representation, latent_dim)
    reps = [[layer, component, "pos", 1, RANK] + [None] * 9 for layer in layers]
    config = {
        "intervention_constant_sources": [True] * len(layers),
        "intervention_dimensions": [D] * len(layers),
        "intervention_types": [f"<class 'pyreft.interventions.{type(m).__name__}'>" for m in interventions],
        "mode": "parallel",
        "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>",
        "representations": reps,
        "sorted_keys": keys,
        "transformers_version": "4.45.2",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for key, m in zip(keys, interventions):
        torch.save(m.state_dict(), path / f"intkey_{key}.bin")
    return keys


# -- a plain-hook reference on the unwrapped HF model -------------------------------------
def reference_logits(lm, prompts, edits):
    """``edits``: (layer, n_first, n_last, fn); fn(h) applied to the block output at the first
    n_first and last n_last real tokens of each row."""
    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    handles = []
    for layer, n_first, n_last, fn in edits:
        def hook(mod, args, out, n_first=n_first, n_last=n_last, fn=fn):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            for b in range(h.shape[0]):
                real = mask[b].nonzero().flatten().tolist()
                for p in sorted(set(real[:n_first] + real[len(real) - n_last:])):
                    h[b, p] = fn(h[b, p])
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handles.append(lm.hf.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = lm.hf(input_ids=enc["input_ids"], attention_mask=mask,
                           position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    finally:
        for h in handles:
            h.remove()
    return logits, mask.bool()


def loreft_formula(sd):
    """pyreft's LoReFT from the saved tensors: h + R^T(W h + b - R h), R^T = rotate_layer."""
    W, b, Rt = sd["weight"], sd["bias"], sd["rotate_layer"]
    return lambda h: h + (h @ W.T + b - h @ Rt) @ Rt.T


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def test_loreft_two_layers_matches_pyreft_formula(lm, tmp_path):
    ms = [trained("LoreftIntervention", seed) for seed in (0, 1)]
    keys = save_like_pyreft(tmp_path, ms, layers=[0, 1])
    assert keys == ["layer_0_comp_block_output_unit_pos_nunit_1#0", "layer_1_comp_block_output_unit_pos_nunit_1#0"]
    g = from_pyreft(tmp_path, positions="f2+l3")
    assert [n.name for n in g] == ["pyreft_L0_0", "pyreft_L1_0"]
    assert [str(n.site) for n in g] == ["resid_post[0] pos=f2+l3", "resid_post[1] pos=f2+l3"]
    for node, m in zip(g, ms):
        assert type(node.op) is rg.LoReFT and node.op.rank == RANK and node.op.width == D
        torch.testing.assert_close(node.op.rotate.data, m.state_dict()["rotate_layer"])
        torch.testing.assert_close(node.op.Rt(), m.state_dict()["rotate_layer"], atol=1e-6, rtol=0)
    sds = [torch.load(tmp_path / f"intkey_{k}.bin", weights_only=True) for k in keys]
    ref, mask = reference_logits(lm, PROMPTS, [(0, 2, 3, loreft_formula(sds[0])), (1, 2, 3, loreft_formula(sds[1]))])
    plain, _ = reference_logits(lm, PROMPTS, [])
    out = g.run(lm, PROMPTS)
    assert (ref[mask] - plain[mask]).abs().max() > 1e-2  # the edit is visible
    torch.testing.assert_close(out.logits[mask], ref[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("old", [False, True])
def test_untied_first_last_pair(lm, tmp_path, old):
    # pyreft's train.py with position "f2+l2" and no --share_weights lists the layers twice:
    # interventions of the first half act on the first 2 tokens, the second half on the last 2
    ms = [trained("LoreftIntervention", seed) for seed in range(4)]
    keys = save_like_pyreft(tmp_path, ms, layers=[0, 1, 0, 1], old=old)
    assert keys[2] == key_of(0, "block_output", 1, old)
    g = from_pyreft(tmp_path, positions="f2+l2")
    assert {n.name: str(n.site) for n in g} == {
        "pyreft_L0_0": "resid_post[0] pos=f2+l0", "pyreft_L1_0": "resid_post[1] pos=f2+l0",
        "pyreft_L0_1": "resid_post[0] pos=f0+l2", "pyreft_L1_1": "resid_post[1] pos=f0+l2"}
    assert len({id(n.op) for n in g}) == 4
    explicit = from_pyreft(tmp_path, positions=["f2+l0", "f2+l0", "f0+l2", "f0+l2"])
    assert [str(n) for n in explicit] == [str(n) for n in g]
    sds = [m.state_dict() for m in ms]
    edits = [(0, 2, 0, loreft_formula(sds[0])), (0, 0, 2, loreft_formula(sds[2])),
             (1, 2, 0, loreft_formula(sds[1])), (1, 0, 2, loreft_formula(sds[3]))]
    ref, mask = reference_logits(lm, PROMPTS, edits)
    torch.testing.assert_close(g.run(lm, PROMPTS).logits[mask], ref[mask], atol=1e-5, rtol=0)


def test_tied_first_last(lm, tmp_path):
    # --share_weights: one intervention per layer, on the first and the last tokens alike
    ms = [trained("LoreftIntervention", 5)]
    save_like_pyreft(tmp_path, ms, layers=[1])
    g = from_pyreft(tmp_path, positions="f2+l2")
    assert [str(n) for n in g] == ["pyreft_L1_0: LoReFT resid_post[1] pos=f2+l2"]
    ref, mask = reference_logits(lm, PROMPTS, [(1, 2, 2, loreft_formula(ms[0].state_dict()))])
    torch.testing.assert_close(g.run(lm, PROMPTS).logits[mask], ref[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_name", list(PYREFT))
def test_every_class_matches_pyreft_forward(tmp_path, cls_name):
    m = trained(cls_name, 7)
    save_like_pyreft(tmp_path, [m], layers=[0])
    (node,) = from_pyreft(tmp_path, positions="last")
    assert type(node.op) is OURS[cls_name] and node.op.rank == RANK
    h = torch.randn(3, 2, D)
    with torch.no_grad():
        torch.testing.assert_close(node.op(h), m(h), atol=1e-5, rtol=0)


def test_noreft_bias_with_nonlinear_act_is_refused(tmp_path):
    save_like_pyreft(tmp_path, [trained("NoreftIntervention", 0)], layers=[0])
    with pytest.raises(rg.GraphFileError, match="proj_layer bias"):
        from_pyreft(tmp_path, positions="last", act="relu")


def test_wrong_shape(tmp_path):
    keys = save_like_pyreft(tmp_path, [trained("LoreftIntervention", 0)], layers=[0])
    sd = dict(torch.load(tmp_path / f"intkey_{keys[0]}.bin", weights_only=True))
    sd["weight"] = torch.randn(3, D)
    torch.save(sd, tmp_path / f"intkey_{keys[0]}.bin")
    with pytest.raises(rg.GraphFileError, match=r"intkey_layer_0.*'weight' has shape \(3, 32\), expected shape \(4, 32\)"):
        from_pyreft(tmp_path, positions="last")


def test_missing_files(tmp_path):
    keys = save_like_pyreft(tmp_path, [trained("LoreftIntervention", s) for s in (0, 1)], layers=[0, 1])
    (tmp_path / f"intkey_{keys[1]}.bin").unlink()
    with pytest.raises(rg.GraphFileError, match=r"missing intervention file intkey_layer_1_comp_block_output"):
        from_pyreft(tmp_path, positions="last")
    (tmp_path / "config.json").unlink()
    with pytest.raises(rg.GraphFileError, match="no config.json"):
        from_pyreft(tmp_path, positions="last")


UNPICKLED = []


def _side_effect():
    UNPICKLED.append(True)
    return torch.zeros(RANK)


class Payload:
    def __reduce__(self):  # unpickling would call _side_effect
        return (_side_effect, ())


def test_non_tensor_pickle_is_refused_safely(tmp_path):
    keys = save_like_pyreft(tmp_path, [trained("LoreftIntervention", 0)], layers=[0])
    sd = dict(torch.load(tmp_path / f"intkey_{keys[0]}.bin", weights_only=True))
    sd["bias"] = Payload()
    torch.save(sd, tmp_path / f"intkey_{keys[0]}.bin")
    with pytest.raises(rg.GraphFileError, match=r"intkey_layer_0.*weights_only=True\) refused it"):
        from_pyreft(tmp_path, positions="last")
    assert not UNPICKLED


def test_config_errors(tmp_path):
    save_like_pyreft(tmp_path, [trained("LoreftIntervention", 0)], layers=[0], component="mlp_input")
    with pytest.raises(rg.GraphFileError, match="component='mlp_input'"):
        from_pyreft(tmp_path, positions="last")
    assert str(from_pyreft(tmp_path, "last", component_map={"mlp_input": "mlp_out"})["pyreft_L0_0"].site) \
        == "mlp_out[0] pos=last"
    with pytest.raises(rg.SiteError, match="2 selectors but the checkpoint has 1"):
        from_pyreft(tmp_path, positions=["last", "f1+l1"], component_map={"mlp_input": "mlp_out"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intervention_types"] = ["<class 'pyreft.interventions.LoreftRoutingIntervention'>"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rg.GraphFileError, match="unsupported pyreft intervention class 'LoreftRoutingIntervention'"):
        from_pyreft(tmp_path, positions="last", component_map={"mlp_input": "mlp_out"})


def test_bfloat16_learned_source(tmp_path):
    # pyreft casts learned_source to bfloat16 unless given dtype=; rotate_layer stays float32
    m = trained("LoreftIntervention", 3)
    m.learned_source.to(torch.bfloat16)
    keys = save_like_pyreft(tmp_path, [m], layers=[1])
    sd = torch.load(tmp_path / f"intkey_{keys[0]}.bin", weights_only=True)
    assert sd["weight"].dtype == torch.bfloat16 and sd["rotate_layer"].dtype == torch.float32
    (node,) = from_pyreft(tmp_path, positions="last")
    h = torch.randn(2, 3, D)
    with torch.no_grad():
        expected = loreft_formula({k: v.float() for k, v in sd.items()})(h)
        torch.testing.assert_close(node.op(h), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused(tmp_path, value):
    """load_graph refuses them; from_pyreft did not, and the graph gave NaN logits."""
    keys = save_like_pyreft(tmp_path, [trained("LoreftIntervention", 0)], layers=[0])
    f = tmp_path / f"intkey_{keys[0]}.bin"
    sd = dict(torch.load(f, weights_only=True))
    sd["bias"][1] = value
    torch.save(sd, f)
    with pytest.raises(rg.GraphFileError) as err:
        from_pyreft(tmp_path, positions="last")
    assert str(f) in str(err.value) and "tensor 'bias' holds NaN or infinite values" in str(err.value)
