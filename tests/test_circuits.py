"""Circuits found by attribution, returned as graphs, proved by running them."""

import copy

import matplotlib
import pandas as pd
import pytest
import torch

import reftgraph as rg
from reftgraph.errors import DataError

matplotlib.use("Agg")

DATA = rg.patching.Counterfactual(["ab c d", "xy zw q", "hi there"], ["cd a b", "zw xy r", "ho where"],
                                  correct=["c", "z", "h"], wrong=["d", "w", "t"])
PLANTED = {(0, 1), (1, 3)}


def planted():
    """A tiny Llama whose heads other than PLANTED write nothing (zero output-projection columns)."""
    lm = rg.models.tiny("llama", seed=2)
    hf = copy.deepcopy(lm.hf)
    dh = lm.arch.head_dim
    with torch.no_grad():
        for layer, block in enumerate(hf.model.layers):
            for h in range(lm.arch.n_heads):
                o = block.self_attn.o_proj.weight
                if (layer, h) in PLANTED:
                    o[:, h * dh:(h + 1) * dh] *= 20
                else:
                    o[:, h * dh:(h + 1) * dh] = 0
            block.self_attn.v_proj.weight.mul_(10)
    return rg.wrap(hf, lm.tokenizer, name="planted")


@pytest.mark.parametrize("method", ["atp", "ig"])
def test_a_planted_circuit_is_found_and_is_faithful(method):
    lm = planted()
    table = rg.circuits.scores(lm, DATA, method=method, rank="magnitude")
    found = table.sort_values("score", ascending=False).head(2)
    assert set(zip(found["layer"], found["head"])) == PLANTED
    assert (table[~table.apply(lambda r: (r["layer"], r["head"]) in PLANTED, axis=1)]["score"] == 0).all()
    rows = rg.circuits.scores(lm, DATA, method=method, rank="mean_abs")      # each row's |estimate|, averaged
    assert set(zip(*rows.nlargest(2, "score")[["layer", "head"]].values.T)) == PLANTED
    assert (rows["score"] >= rows["estimate"].abs() - 1e-6).all()
    circuit = rg.circuits.discover(lm, DATA, size=2, method=method, rank="magnitude")
    assert set(map(tuple, rg.circuits.members(circuit, lm)[["layer", "head"]].values.tolist())) == PLANTED
    f = rg.circuits.faithfulness(circuit, lm, DATA)
    assert f["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert abs(f["full"] - f["empty"]) > 1e-3        # the planted heads matter
    assert f["size"] == 2


def test_faithfulness_runs_the_graph(tmp_path):
    lm = rg.models.tiny("llama")
    circuit = rg.circuits.discover(lm, DATA, size=3)
    f = rg.circuits.faithfulness(circuit, lm, DATA)
    # by hand: the graph on the clean prompts, the outside heads from the corrupted ones
    logits = circuit.run(lm, DATA.source, sources={"corrupt": DATA.base}).next_token_logits
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in DATA.correct], \
        [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in DATA.wrong]
    by_hand = (logits[range(3), ids[0]] - logits[range(3), ids[1]]).mean().item()
    assert f["circuit"] == pytest.approx(by_hand, abs=1e-6)
    clean = rg.Graph().run(lm, DATA.source).next_token_logits
    assert f["full"] == pytest.approx((clean[range(3), ids[0]] - clean[range(3), ids[1]]).mean().item(), abs=1e-6)
    # a circuit saves, loads and runs identically
    path = tmp_path / "circuit.safetensors"
    circuit.save(path, model=lm)
    again = rg.load_graph(path)
    assert str(again) == str(rg.Graph(circuit.nodes))      # the nodes; the kept table stays with the Circuit
    same = again.run(lm, DATA.source, sources={"corrupt": DATA.base}).next_token_logits
    assert torch.equal(same, logits)
    assert rg.circuits.members(again, lm).equals(rg.circuits.members(circuit, lm))


def test_mean_ablation_mlps_and_curve():
    lm = rg.models.tiny("llama")
    circuit = rg.circuits.discover(lm, DATA, size=0.5, nodes="heads+mlps", ablate="mean")
    kinds = rg.circuits.members(circuit, lm)["kind"].value_counts().to_dict()
    assert sum(kinds.values()) == 5                           # half of 8 heads + 2 MLPs
    assert all(isinstance(n.op, rg.Ablate) for n in circuit.nodes) and "corrupt" not in circuit.streams
    f = rg.circuits.faithfulness(circuit, lm, DATA)
    assert f["empty"] != f["full"]
    df = rg.circuits.curve(lm, DATA, sizes=[1, 8], methods=["atp", "ig"], ig_steps=2)
    assert df.groupby("method")["faithfulness"].last().round(6).tolist() == [1.0, 1.0]   # all heads kept
    ax = rg.circuits.plot_curve(df).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["atp", "ig"]
    table = rg.circuits.scores(lm, DATA)
    kept = kinds.get("head", 0)
    mlps = kinds.get("mlp", 0)
    title = f"circuit: {kept} heads" + (f", {mlps} MLP{'s' if mlps != 1 else ''}" if mlps else "")
    assert rg.circuits.draw(circuit, lm, table).axes[0].get_title() == title
    assert rg.circuits.top_layers(table, 1) in ([0], [1])


def test_top_layers_feed_reft_graph():
    lm = rg.models.tiny("llama", num_hidden_layers=4)
    table = rg.patching.attribute(lm, DATA, "resid_post", positions=[-1])
    layers = rg.circuits.top_layers(table, 2)
    g = rg.reft_graph(lm, layers=layers, positions="last", rank=2)
    assert sorted({n.site.layer for n in g.nodes}) == layers


def test_bad_circuit_input(monkeypatch):
    lm = rg.models.tiny("llama")

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(lm.hf, "forward", no_forward)
    for size, match in [(0, "valid sizes: 1..8"), (9, "valid sizes: 1..8"), (1.5, r"in \(0, 1\]"),
                        (0.01, "keeps 0 nodes"), ("3", "number of nodes")]:
        with pytest.raises(DataError, match=match):
            rg.circuits.discover(lm, DATA, size=size)
    with pytest.raises(DataError, match="nodes must be one of"):
        rg.circuits.discover(lm, DATA, nodes="edges")
    with pytest.raises(DataError, match="ablate must be one of"):
        rg.circuits.discover(lm, DATA, ablate="zero")
    with pytest.raises(DataError, match="rank must be one of"):
        rg.circuits.scores(lm, DATA, rank="abs")
    with pytest.raises(DataError, match="Counterfactual"):
        rg.circuits.scores(lm, pd.DataFrame())
    with pytest.raises(DataError, match="valid sizes: 1..8"):
        rg.circuits.curve(lm, DATA, sizes=[2, 20])
    with pytest.raises(DataError, match="top_layers: k=5; valid 1..2"):
        rg.circuits.top_layers(pd.DataFrame({"layer": [0, 1], "score": [1.0, 2.0]}), 5)


def test_per_position_circuits():
    lm = planted()
    even = rg.patching.Counterfactual(["ab c d", "xy z w"], ["cd a b", "zw x y"], correct=["c", "z"], wrong=["d", "w"])
    table = rg.circuits.scores(lm, even, per_position=True, rank="magnitude")
    assert len(table) == 8 * 6 and table["position"].tolist()[:8] == [0] * 4 + [1] * 4
    outside = table[~table.apply(lambda r: (r["layer"], r["head"]) in PLANTED, axis=1)]
    assert (outside["score"] == 0).all()
    # the planted heads at every position: the whole effect
    kept = table[table.apply(lambda r: (r["layer"], r["head"]) in PLANTED, axis=1)]
    circuit = rg.circuits.circuit_graph(lm, even, kept)
    assert rg.circuits.faithfulness(circuit, lm, even)["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    members = rg.circuits.members(circuit, lm)
    assert sorted(map(tuple, members[["layer", "head", "position"]].values.tolist())) == \
        sorted(map(tuple, kept[["layer", "head", "position"]].values.tolist()))
    # fewer positions: a smaller circuit, patched position by position, equal to the same edits by hand
    small = rg.circuits.discover(lm, even, size=3, table=table)
    assert len(rg.circuits.members(small, lm)) == 3
    by_hand = rg.Graph()
    for node in small.nodes:
        by_hand.add(node.site, rg.Patch("corrupt"))
    a = small.run(lm, even.source, sources={"corrupt": even.base}).next_token_logits
    b = by_hand.run(lm, even.source, sources={"corrupt": even.base}).next_token_logits
    assert torch.equal(a, b)
    mean = rg.circuits.circuit_graph(lm, even, kept, ablate="mean")
    assert all(n.op.value.shape[0] == len(n.site.positions) for n in mean.nodes)    # a mean per position
    with pytest.raises(DataError, match="one length"):
        rg.circuits.scores(lm, DATA, per_position=True)
