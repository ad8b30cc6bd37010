"""``rg.reft_graph``: layers, untied / tied positions, shared layers, parameter counts (the
ReFT paper's formula), ``print_trainable_parameters``, orthonormality of R and pickling."""

import copy
import pickle
import types

import pytest
import torch

import reftgraph as rg
from reftgraph.arch import Arch
from reftgraph.core.ops.reft import REFT_OPS

ORTHONORMAL = ("LoReFT", "DiReFT", "ConsReFT", "LoBiReFT")
FREE = ("NoReFT", "NoDiReFT")
WITH_W = ("LoReFT", "NoReFT", "DiReFT", "NoDiReFT")




def per_op(name: str, r: int, d: int) -> int:
    """The ReFT paper's count: R (r x d), W (r x d) and b (r); no W for ConsReFT / LoBiReFT."""
    return 2 * r * d + r if name in WITH_W else r * d + r


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


@pytest.fixture(scope="module")
def llama7b():
    """LLaMA-7B's architecture on the meta device (no weights): ``reft_graph`` only reads ``model.arch``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    return types.SimpleNamespace(arch=Arch.of(hf))


def distinct_ops(g):
    return {id(n.op): n.op for n in g.nodes}


# -- configurations -----------------------------------------------------------------------

def test_layers_list(lm):
    g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
    assert [n.name for n in g.nodes] == ["L1"]
    assert g["L1"].site == rg.Site("resid_post", layer=1, positions="last")
    assert isinstance(g["L1"].op, rg.LoReFT)


def test_layers_all(lm):
    g = rg.reft_graph(lm, layers="all", positions="f2+l2", rank=2)
    assert sorted({n.site.layer for n in g.nodes}) == list(range(lm.arch.n_layers))
    assert len(g) == 2 * lm.arch.n_layers


def test_untied_positions_two_nodes_per_layer_with_distinct_ops(lm):
    g = rg.reft_graph(lm, layers=[0, 1], positions="f5+l5", rank=4)
    assert [n.name for n in g.nodes] == ["L0_first", "L0_last", "L1_first", "L1_last"]
    assert [str(n.site) for n in g.nodes] == [
        "resid_post[0] pos=f5+l0", "resid_post[0] pos=f0+l5",
        "resid_post[1] pos=f5+l0", "resid_post[1] pos=f0+l5"]
    ops = distinct_ops(g)
    assert len(ops) == 4
    first, last = g["L0_first"].op, g["L0_last"].op
    assert not torch.equal(first.rotate, last.rotate)  # seeded differently, not copies
    assert g.num_parameters() == 4 * per_op("LoReFT", 4, 32)


def test_share_positions_one_node_per_layer(lm):
    g = rg.reft_graph(lm, layers=[0, 1], positions="f5+l5", rank=4, share_positions=True)
    assert [n.name for n in g.nodes] == ["L0", "L1"]
    assert [str(n.site) for n in g.nodes] == ["resid_post[0] pos=f5+l5", "resid_post[1] pos=f5+l5"]
    assert len(distinct_ops(g)) == 2
    assert g.num_parameters() == 2 * per_op("LoReFT", 4, 32)


def test_share_layers_counts_the_shared_op_once(lm):
    g = rg.reft_graph(lm, layers="all", positions="f5+l5", rank=4, share_layers=True)
    assert len(g) == 4
    assert g["L0_first"].op is g["L1_first"].op
    assert g["L0_last"].op is g["L1_last"].op
    assert g["L0_first"].op is not g["L0_last"].op
    assert g.num_parameters() == 2 * per_op("LoReFT", 4, 32)

    tied = rg.reft_graph(lm, layers="all", positions="f5+l5", rank=4, share_layers=True, share_positions=True)
    assert len(tied) == 2 and tied["L0"].op is tied["L1"].op
    assert tied.num_parameters() == per_op("LoReFT", 4, 32)


def test_one_position_group_when_first_or_last_is_zero(lm):
    g = rg.reft_graph(lm, layers=[0], positions="f0+l3", rank=2)
    assert [str(n.site) for n in g.nodes] == ["resid_post[0] pos=f0+l3"]


def test_other_component_uses_its_width(lm):
    g = rg.reft_graph(lm, layers=[0], positions="last", rank=2, component="mlp_act")
    assert g["L0"].op.width == lm.arch.d_mlp
    g.run(lm, ["abc"])  # compiles and runs at that width


def test_bad_arguments(lm):
    with pytest.raises(ValueError, match="LoReFT"):
        rg.reft_graph(lm, layers=[0], op="NotAReFT")
    with pytest.raises(ValueError, match="rank"):
        rg.reft_graph(lm, layers=[0], rank=33)


@pytest.mark.parametrize("layers, message", [
    ([0, 32], r"layer 32 is out of range; tiny-llama has 2 layers: valid layers 0\.\.1 \(or -2\.\.-1\)"),
    ([-3], r"layer -3 is out of range; .* valid layers 0\.\.1"),
    ([1.0], r"layers are a list of ints .* got 1\.0"),
    ([True], r"got True"),
    ("10", r"got '10'"),
    (5, r"got 5"),
])
def test_layers_outside_the_model_are_refused_at_build(lm, layers, message):
    """A 30-layer model given layers=[10, 32] fails when the graph is built, naming the layer
    and the valid range, not at the first run."""
    with pytest.raises(rg.SiteError, match=message):
        rg.reft_graph(lm, layers=layers)


def test_negative_and_numpy_layers_are_accepted(lm):
    import numpy as np

    g = rg.reft_graph(lm, layers=[np.int64(0), -1], positions="last", rank=2)
    assert [n.name for n in g.nodes] == ["L0", "L-1"]
    g.run(lm, ["abc"])


# -- parameter counts: the paper's formula ------------------------------------------------

def test_paper_count_llama7b(llama7b):
    """LoReFT on LLaMA-7B, 4 layers, f5+l5 untied, rank 4: 262,176 parameters (the paper)."""
    g = rg.reft_graph(llama7b, layers=[2, 10, 18, 26], positions="f5+l5", rank=4)
    assert len(g) == 8 and len(distinct_ops(g)) == 8
    assert g.num_parameters() == 4 * 2 * (2 * 4 * 4096 + 4) == 262_176
    assert rg.reft_graph(llama7b, layers=[2, 10, 18, 26], positions="f5+l5", rank=4,
                         share_positions=True).num_parameters() == 262_176 // 2
    assert rg.reft_graph(llama7b, layers=[2, 10, 18, 26], positions="f5+l5", rank=4,
                         share_layers=True).num_parameters() == 262_176 // 4


@pytest.mark.parametrize("name", sorted(REFT_OPS))
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_count_per_op_type(llama7b, name, rank):
    g = rg.reft_graph(llama7b, layers=[0], positions="last", rank=rank, op=name)
    op = g["L0"].op
    assert type(op).__name__ == name
    assert g.num_parameters() == sum(p.numel() for p in op.parameters()) == per_op(name, rank, 4096)


def test_print_trainable_parameters(lm, capsys):
    g = rg.reft_graph(lm, layers=[0, 1], positions="f1+l1", rank=4)
    n = 4 * (2 * 4 * 32 + 4)
    m = sum(p.numel() for p in lm.hf.parameters())
    expected = f"trainable intervention params: {n:,d} || model params: {m:,d} || trainable%: {100 * n / m:.4f}"
    assert rg.print_trainable_parameters(g, lm) == expected
    assert capsys.readouterr().out == expected + "\n"


# -- orthonormality -----------------------------------------------------------------------

def gram_error(op) -> float:
    R = op.R().detach()
    return float((R @ R.T - torch.eye(op.rank)).abs().max())


@pytest.fixture(scope="module")
def trained(lm):
    """One op of each type at its own site, initial copies, then a few training steps."""
    sites = {"LoReFT": ("resid_post", 0), "NoReFT": ("resid_post", 1), "DiReFT": ("mlp_out", 0),
             "NoDiReFT": ("mlp_out", 1), "ConsReFT": ("attn_out", 0), "LoBiReFT": ("attn_out", 1)}
    g = rg.Graph()
    for name, (component, layer) in sites.items():
        g.add(rg.Site(component, layer=layer, positions="f1+l1"), REFT_OPS[name](width=32, rank=4, seed=1),
              name=name)
    before = {n.name: copy.deepcopy(n.op) for n in g.nodes}
    data = rg.data.PromptResponse([("abc", "de"), ("fghi", "jk")])
    rg.train(g, lm, data, epochs=3, batch_size=2, lr=5e-2, warmup=0.0, progress=False)
    return g, before


@pytest.mark.parametrize("name", sorted(REFT_OPS))
def test_R_orthonormal_at_init(name):
    op = REFT_OPS[name](width=32, rank=4, seed=0)
    assert gram_error(op) < 1e-5
    # the learned basis is a plain function of a parameter: no torch parametrization
    assert not torch.nn.utils.parametrize.is_parametrized(op)


@pytest.mark.parametrize("name", ORTHONORMAL)
def test_R_orthonormal_after_training(trained, name):
    g, before = trained
    op = g[name].op
    assert not torch.equal(op.rotate, before[name].rotate), "training did not move R"
    assert not torch.allclose(op.R(), before[name].R(), atol=1e-4)
    assert gram_error(op) < 1e-5
    assert torch.allclose(op.R() @ op.R().T, torch.eye(4), atol=1e-5)


@pytest.mark.parametrize("name", FREE)
def test_R_unconstrained_for_No_variants(trained, name):
    g, before = trained
    assert gram_error(before[name]) < 1e-5      # initialised orthonormal ...
    assert gram_error(g[name].op) > 1e-3        # ... but free to leave the Stiefel manifold
    assert torch.equal(g[name].op.R(), g[name].op.rotate.T)


# -- pickling -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REFT_OPS))
def test_ops_pickle_and_deepcopy(name):
    op = REFT_OPS[name](width=16, rank=4, act="relu", seed=3)
    with torch.no_grad():  # move off the init so the copies carry trained-looking values
        op.rotate.add_(0.1 * torch.randn_like(op.rotate))
        op.bias.add_(0.5)
    op.eval()
    h = torch.randn(2, 3, 16)
    expected = op(h)
    for clone in (pickle.loads(pickle.dumps(op)), copy.deepcopy(op)):
        assert type(clone) is type(op)
        assert clone.config() == op.config()
        assert torch.equal(clone(h), expected)
        assert torch.equal(clone(h, subspace=(1, 3)), op(h, subspace=(1, 3)))
        assert gram_error(clone) == gram_error(op)


# -- subspaces of the learned basis ---------------------------------------------------------

def test_subspace_beyond_rank_raises_site_error_before_forward(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last", subspace=(0, 5)), rg.LoReFT(width=32, rank=4),
          name="r")
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(rg.SiteError, match="subspace"):
            g.run(lm, ["abc"])
    finally:
        handle.remove()
    assert calls == []
