"""Multi-node graphs in one pass: later edits see earlier ones; patches read other sites."""

import pytest
import torch

import reftgraph as rg
from oracle import capture, encode, install, real_positions

BASE = ["the cat sat on it", "a dog ran"]
SOURCE = ["my hat was on top", "a cow sat"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def lm(request):
    return rg.models.tiny(request.param)


def patch_edit(src, src_mask, base_mask, src_pos, base_pos, head=None):
    """Write source[row, src_pos(row)] (head ``head``) into base[row, base_pos(row)]."""
    src_real, base_real = real_positions(src_mask), real_positions(base_mask)

    def edit(t):
        out = t.clone()
        for b in range(t.shape[0]):
            s, p = src_real[b][src_pos], base_real[b][base_pos]
            if head is None:
                out[b, p] = src[b, s]
            else:
                out[b, p, head] = src[b, s, head]
        return out

    return edit


@pytest.mark.parametrize("side", ["left", "right"])
def test_two_head_path_matches_oracle(lm, side):
    """head 1 at layer 0 position 0, then head 2 at layer 1 position 1 (which sees the first edit)."""
    fam, cfg = lm.arch.family.name, lm.hf.config
    g = rg.Graph()
    g.add(rg.Site("head_out", layer=0, head=1, positions=[0]), rg.Patch("source"), name="a")
    g.add(rg.Site("head_out", layer=1, head=2, positions=[1]), rg.Patch("source"), name="b")
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="end")
    out = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side)

    base, src = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    handles = []
    for layer, head, pos in ((0, 1, 0), (1, 2, 1)):
        s = capture(lm.hf, fam, "head_out", layer, src, cfg)
        handles += install(lm.hf, fam, "head_out", layer,
                           patch_edit(s, src["attention_mask"], base["attention_mask"], pos, pos, head), cfg)
    try:
        ref = lm.hf(**base)
    finally:
        for h in handles:
            h.remove()
    last = [r[-1] for r in real_positions(base["attention_mask"])]
    torch.testing.assert_close(out.next_token_logits, ref.logits[torch.arange(2), last], atol=1e-5, rtol=0)
    assert out["end"].shape == (2, 1, lm.arch.d_model)


def test_later_edit_sees_earlier_one(lm):
    """A Collect downstream of an Add sees the edit; a Collect upstream does not."""
    v = torch.randn(lm.arch.d_model)
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Collect(), name="before")
    g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(v), name="add")
    g.add(rg.Site("resid_pre", layer=1, positions="last"), rg.Collect(), name="after")
    out = g.run(lm, BASE)
    torch.testing.assert_close(out["after"], out["before"] + v, atol=1e-6, rtol=0)
    assert ("add", "after") in g.edges and ("before", "add") not in g.edges


@pytest.mark.parametrize("side", ["left", "right"])
def test_patch_reads_another_site(lm, side):
    """A patch may read other positions (and an earlier layer) of the source than it writes."""
    fam, cfg = lm.arch.family.name, lm.hf.config
    src_site = rg.Site("resid_pre", layer=0, positions=[2])
    g = rg.Graph()
    mid = "resid_mid" if lm.arch.table()["resid_mid"] == "verified" else "attn_out"   # parallel blocks: no resid_mid
    g.add(rg.Site(mid, layer=1, positions=[-1]), rg.Patch("source", site=src_site), name="p")
    out = g.run(lm, BASE, sources={"source": SOURCE}, padding_side=side)

    base, src = encode(lm.tokenizer, BASE, side), encode(lm.tokenizer, SOURCE, side)
    s = capture(lm.hf, fam, "resid_pre", 0, src, cfg)
    handles = install(lm.hf, fam, mid, 1,
                      patch_edit(s, src["attention_mask"], base["attention_mask"], 2, -1), cfg)
    try:
        ref = lm.hf(**base).logits
    finally:
        for h in handles:
            h.remove()
    last = [r[-1] for r in real_positions(base["attention_mask"])]
    torch.testing.assert_close(out.next_token_logits, ref[torch.arange(2), last], atol=1e-5, rtol=0)


def test_edit_on_a_source_stream_reaches_the_patch(lm):
    """Nodes may edit a source stream; a patch downstream reads the edited source."""
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=0, positions="all"), rg.Ablate("zero"), name="wipe", stream="source")
    g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Patch("source"), name="p")
    g.add(rg.Site("resid_pre", layer=0, positions="last"), rg.Collect(), name="seen")
    out = g.run(lm, BASE, sources={"source": SOURCE})
    assert ("wipe", "p") in g.edges
    assert torch.count_nonzero(out["seen"]) == 0
