"""Every op is called one way (``Op.edit``): the same inputs for all, each forward taking
those it names, so a wrapper such as ``Without`` passes everything to the op it wraps and
says what the wrapped op says (per-row subspaces, half precision, collecting)."""

import pytest
import torch

import reftgraph as rg
from reftgraph.core.ops import Without

PROMPTS = ["the cat sat on it", "a dog ran"]


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def without_loreft():
    op = rg.LoReFT(width=32, rank=4, seed=3)
    with torch.no_grad():
        op.bias.normal_(generator=torch.Generator().manual_seed(4))
    return Without(op, directions=torch.eye(32)[:1])


def test_without_loreft_takes_per_row_subspaces(lm):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), without_loreft(), name="w")
    both = g.run(lm, PROMPTS, subspaces=[[0, 1], [2, 3]]).logits
    for row, dims in enumerate(([0, 1], [2, 3])):
        alone = g.run(lm, [PROMPTS[row]], subspaces=[dims]).logits[0]
        n = alone.shape[0]
        got = both[row, :n] if g.run(lm, PROMPTS).attention_mask[row, 0] else both[row, -n:]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    plain = g.run(lm, PROMPTS).logits
    assert not torch.allclose(both, plain, atol=1e-4), "the per-row subspaces changed nothing"
    assert g["w"].op.per_row_subspaces and g["w"].op.learned_basis


def test_without_collect_collects_in_the_models_dtype():
    lm = rg.models.tiny("llama", dtype=torch.bfloat16)
    g = rg.Graph()
    g.add(rg.Site("mlp_out", layer=1, positions="last"), Without(rg.Collect(), torch.eye(32)[:1]), name="w")
    g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="c")
    out = g.run(lm, PROMPTS)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], out["c"])


def test_every_op_gets_the_inputs_its_forward_names():
    seen = {}

    class Everything(rg.Op):
        def forward(self, h, **inputs):
            seen.update(inputs)
            return h

    class HOnly(rg.Op):
        def forward(self, h):
            return h + 1

    h = torch.zeros(1, 1, 2)
    Everything().edit(h, source=None, valid=torch.ones(1, 1, dtype=torch.bool), subspace=(0,), rows=None)
    assert sorted(seen) == ["inputs", "rows", "source", "subspace", "valid"] and seen["subspace"] == (0,)
    assert HOnly().edit(h, valid=torch.ones(1, 1, dtype=torch.bool), subspace=(1,)).tolist() == [[[1.0, 1.0]]]


def test_without_follows_the_inner_ops_traits_live():
    inner = rg.Collect()
    op = Without(inner, torch.eye(2)[:1])
    assert op.collects and op.half_precision and not op.learned_basis
    loreft = Without(rg.LoReFT(width=4, rank=2), torch.eye(4)[:1])
    assert loreft.learned_basis and loreft.per_row_subspaces and not loreft.collects
