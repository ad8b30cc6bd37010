"""Saving and loading graphs: ``graph.json`` + ``weights.safetensors``, bit-exact round trips,
shared ops, checks against the model, atomic writes and no pickle anywhere."""

import json
import os
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file

import reftgraph as rg
import reftgraph.io

PROMPTS = ["hello world", "a cat", "the dog sat on it"]
SOURCES = {"source": ["one two", "three", "four five six"]}
S = rg.Site




@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def every_op_graph() -> rg.Graph:
    """A graph with every op type, a shared op and subspaces, on tiny llama (width 32, mlp 48,
    4 heads and 2 key-value heads of dim 8). Non-zero values everywhere so a lost tensor shows."""
    torch.manual_seed(0)
    g = rg.Graph()
    lo = rg.LoReFT(width=32, rank=4, act="relu", seed=1)
    no = rg.NoReFT(width=32, rank=3, seed=2)
    shared = rg.DiReFT(width=32, rank=2, act="tanh", seed=3)
    with torch.no_grad():
        for op in (lo, no, shared):
            op.bias.add_(torch.randn_like(op.bias))
    g.add(S("resid_post", 0, positions="f1+l1", subspace=(0, 2)), lo, name="lo")
    g.add(S("resid_post", 1, positions="last"), no, name="no")
    g.add(S("mlp_out", 0, positions=[0]), shared, name="di_a")
    g.add(S("mlp_out", 1, positions=[0]), shared, name="di_b")  # the same op object
    g.add(S("attn_out", 1, positions="last"), rg.NoDiReFT(width=32, rank=4, seed=4), name="nodi")
    g.add(S("resid_pre", 1, positions="f1+l1"), rg.ConsReFT(width=32, rank=2, seed=5), name="cons")
    g.add(S("resid_mid", 0, positions="last"), rg.LoBiReFT(width=32, rank=2, seed=6), name="lobi")
    g.add(S("resid_post", 0, positions="last"), rg.Add(torch.randn(32), scale=0.5, trainable=True), name="add_t")
    g.add(S("mlp_act", 1, positions=[0]), rg.Add(torch.randn(48), scale=2.0), name="add")
    g.add(S("head_out", 1, head=2, positions=[0]), rg.Set(torch.randn(8)), name="set")
    g.add(S("v", 0, head=1, positions="last"), rg.Ablate("zero"), name="abl_zero")
    g.add(S("mlp_out", 1, positions="last", subspace=(0, 3, 5)), rg.Ablate("mean", value=torch.randn(3)),
          name="abl_mean")
    g.add(S("q", 1, head=(0, 3), positions="all"), rg.Ablate("mean"), name="abl_mean_batch")
    g.add(S("head_out", 0, head=0, positions="last"), rg.Ablate("resample", seed=7), name="abl_resample")
    g.add(S("resid_pre", 1, positions="last"),
          rg.Patch(source="source", site=S("resid_pre", 0, positions="last")), name="patch")
    g.add(S("resid_post", 1, positions="all"), rg.Collect(), name="collect")
    g.add(S("resid_post", -1, positions="last"), rg.Classify(width=32, n_classes=3), name="cls")
    g.ops.eval()
    return g


OP_TYPES = {"LoReFT", "NoReFT", "DiReFT", "NoDiReFT", "ConsReFT", "LoBiReFT", "Add", "Set", "Ablate",
            "Patch", "Collect", "Classify"}


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    g = every_op_graph()
    path = tmp_path_factory.mktemp("io") / "graph"
    assert rg.save(g, path, model=lm) == path
    return g, path


def run(g, lm):
    return g.run(lm, PROMPTS, sources=SOURCES)


def test_round_trip_is_bit_exact(lm, saved):
    g, path = saved
    g2 = rg.load_graph(path, model=lm)
    assert [n.name for n in g2.nodes] == [n.name for n in g.nodes]
    assert [n.site for n in g2.nodes] == [n.site for n in g.nodes]
    assert [n.stream for n in g2.nodes] == [n.stream for n in g.nodes]
    assert [type(n.op) for n in g2.nodes] == [type(n.op) for n in g.nodes]
    assert [n.op.config() for n in g2.nodes] == [n.op.config() for n in g.nodes]
    assert list(g2.edges) == list(g.edges)
    for node in g.nodes:
        a, b = node.op.state_dict(), g2[node.name].op.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), node.name
    for node in g.nodes:  # trainable stays trainable, buffers stay buffers
        assert ({k for k, _ in node.op.named_parameters()}
                == {k for k, _ in g2[node.name].op.named_parameters()}), node.name
    out, out2 = run(g, lm), run(g2, lm)
    assert torch.equal(out.logits, out2.logits)
    assert out.collected.keys() == out2.collected.keys() == {"collect", "cls"}
    for name in out.collected:
        assert torch.equal(out[name], out2[name])
    # the graph changes the model's output (so equal logits mean something)
    assert not torch.allclose(out.logits, rg.Graph().run(lm, PROMPTS).logits)


def test_shared_op_stays_shared(saved):
    g, path = saved
    g2 = rg.load_graph(path)
    assert g2["di_a"].op is g2["di_b"].op
    assert g2["lo"].op is not g2["no"].op
    assert g2.num_parameters() == g.num_parameters()
    assert g2.num_parameters(trainable_only=False) == g.num_parameters(trainable_only=False)
    shared = g["di_a"].op
    assert sum(p.numel() for p in g.parameters()) == g.num_parameters()
    assert g.num_parameters() == sum(sum(p.numel() for p in op.parameters())
                                     for op in {id(n.op): n.op for n in g.nodes}.values())
    assert sum(p.numel() for p in shared.parameters()) == 2 * 2 * 32 + 2


def test_graph_json(lm, saved):
    g, path = saved
    def no_constants(name):  # NaN / Infinity are not JSON
        raise AssertionError(f"graph.json holds {name}")

    spec = json.loads((path / "graph.json").read_text(), parse_constant=no_constants)
    assert spec["format"] == "reftgraph-graph"
    assert spec["model"]["family"] == "llama"
    assert spec["model"]["d_model"] == 32
    assert spec["model"]["n_layers"] == 2
    assert len(spec["nodes"]) == len(g)
    assert {op["type"] for op in spec["ops"]} == OP_TYPES
    assert len(spec["ops"]) == len(g) - 1  # the shared op is written once
    for entry in spec["nodes"]:
        node = g[entry["name"]]
        assert entry["site"] == node.site.to_dict()
        assert rg.Site.from_dict(entry["site"]) == node.site
        assert entry["stream"] == node.stream
        op = spec["ops"][entry["op"]]
        assert op["type"] == type(node.op).__name__
        assert op["config"] == json.loads(json.dumps(node.op.config()))
    names = {e["name"]: e for e in spec["nodes"]}
    assert names["di_a"]["op"] == names["di_b"]["op"]
    assert names["lo"]["site"]["subspace"] == [0, 2]
    assert names["patch"]["site"]["component"] == "resid_pre"
    patch_op = spec["ops"][names["patch"]["op"]]
    assert patch_op["config"] == {"source": "source",
                                  "site": {"component": "resid_pre", "layer": 0, "positions": "last",
                                           "head": None, "subspace": None}}


def test_weights_load_with_safetensors(saved):
    g, path = saved
    tensors = load_file(str(path / "weights.safetensors"))
    unique_ops = {id(n.op): n.op for n in g.nodes}.values()
    assert sum(t.numel() for t in tensors.values()) == sum(
        t.numel() for op in unique_ops for t in op.state_dict().values())
    with safetensors.safe_open(str(path / "weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_saved_without_model(tmp_path, lm):
    g = every_op_graph()
    rg.save(g, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "graph.json").read_text())["model"] is None
    g2 = rg.load_graph(tmp_path / "g", model=lm)  # still checked against the model's sites
    assert torch.equal(run(g, lm).logits, run(g2, lm).logits)


# -- checks against the model ------------------------------------------------------------

def test_other_width_raises(saved):
    _, path = saved
    wide = rg.models.tiny("llama", hidden_size=64)
    with pytest.raises(rg.GraphFileError) as err:
        rg.load_graph(path, model=wide)
    assert "32" in str(err.value) and "64" in str(err.value)


def test_other_family_raises(saved):
    _, path = saved
    gpt2 = rg.models.tiny("gpt2")
    with pytest.raises(rg.GraphFileError) as err:
        rg.load_graph(path, model=gpt2)
    assert "llama" in str(err.value) and "gpt2" in str(err.value)


def test_layer_out_of_range_raises_before_any_forward(lm, tmp_path):
    deep = rg.models.tiny("llama", num_hidden_layers=4)
    g = rg.Graph()
    g.add(S("resid_post", 3, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="deep")
    rg.save(g, tmp_path / "g", model=deep)
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(rg.SiteError, match=r"layer 3.*0\.\.1"):
            rg.load_graph(tmp_path / "g", model=lm)
        g2 = rg.load_graph(tmp_path / "g")  # without a model it loads ...
        with pytest.raises(rg.SiteError, match="layer 3"):  # ... and the run refuses it up front
            g2.run(lm, PROMPTS)
    finally:
        handle.remove()
    assert calls == []


# -- atomic writes ---------------------------------------------------------------------------

def snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_over_existing_replaces_it(tmp_path, lm):
    path = tmp_path / "g"
    g = every_op_graph()
    rg.save(g, path)
    small = rg.Graph()
    small.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="only")
    (path / "stale.txt").write_text("left over")
    rg.save(small, path)
    assert sorted(os.listdir(tmp_path)) == ["g"]
    assert sorted(os.listdir(path)) == ["graph.json", "weights.safetensors"]
    assert [n.name for n in rg.load_graph(path).nodes] == ["only"]


def test_interrupted_save_keeps_the_old_graph(tmp_path, lm, monkeypatch):
    path = tmp_path / "g"
    g = every_op_graph()
    rg.save(g, path, model=lm)
    before = snapshot(path)

    def crash(tensors, filename, metadata=None):  # half a file, then the disk fills up
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(reftgraph.io, "save_file", crash)
    other = rg.Graph()
    other.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="new")
    with pytest.raises(OSError, match="No space"):
        rg.save(other, path, model=lm)
    with pytest.raises(OSError, match="No space"):
        rg.save(other, tmp_path / "fresh")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["g"]  # no temporary folders, no half-written 'fresh'
    assert snapshot(path) == before
    g2 = rg.load_graph(path, model=lm)
    assert torch.equal(run(g, lm).logits, run(g2, lm).logits)


@pytest.mark.parametrize("missing", ["graph.json", "weights.safetensors"])
def test_missing_file_raises(saved, tmp_path, missing):
    g, _ = saved
    rg.save(g, tmp_path / "g")
    (tmp_path / "g" / missing).unlink()
    with pytest.raises(rg.GraphFileError, match=missing):
        rg.load_graph(tmp_path / "g")


def test_corrupt_files_raise(saved, tmp_path):
    g, _ = saved
    rg.save(g, tmp_path / "g")
    weights = tmp_path / "g" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(rg.GraphFileError, match="weights.safetensors"):
        rg.load_graph(tmp_path / "g")
    rg.save(g, tmp_path / "g")
    (tmp_path / "g" / "graph.json").write_text("{not json")
    with pytest.raises(rg.GraphFileError, match="graph.json"):
        rg.load_graph(tmp_path / "g")


def test_missing_directory_raises(tmp_path):
    with pytest.raises(rg.GraphFileError):
        rg.load_graph(tmp_path / "nowhere")


def test_not_a_graph_raises(saved, tmp_path):
    g, _ = saved
    rg.save(g, tmp_path / "g")
    spec = json.loads((tmp_path / "g" / "graph.json").read_text())
    spec["ops"][0]["type"] = "Evil"
    (tmp_path / "g" / "graph.json").write_text(json.dumps(spec))
    with pytest.raises(rg.GraphFileError, match="Evil"):
        rg.load_graph(tmp_path / "g")
    spec["format"] = "something else"
    (tmp_path / "g" / "graph.json").write_text(json.dumps(spec))
    with pytest.raises(rg.GraphFileError, match="format"):
        rg.load_graph(tmp_path / "g")


# -- no pickle: the source checks are in test_safe_loading.py ----------------------------------

def test_io_text_has_no_pickle():
    text = Path(reftgraph.io.__file__).read_text()
    assert "torch.load(" not in text and "torch.save(" not in text and "import pickle" not in text


# -- dropout outside training --------------------------------------------------------------------

def test_runs_with_dropout_ops_are_deterministic(lm, tmp_path):
    g = rg.reft_graph(lm, layers=[0, 1], positions="f1+l1", rank=4, dropout=0.5)
    rg.save(g, tmp_path / "g", model=lm)
    g2 = rg.load_graph(tmp_path / "g", model=lm)
    for graph in (g2, g):
        a, b = graph.run(lm, PROMPTS).logits, graph.run(lm, PROMPTS).logits
        assert torch.equal(a, b)
    assert torch.equal(g.run(lm, PROMPTS).logits, g2.run(lm, PROMPTS).logits)
