"""Saving and loading graphs: ``graph.json`` + ``weights.safetensors``, bit-exact round trips,
shared ops, checks against the model, saves that refuse what would not load, saves that
readers and other writers always see whole, and no pickle anywhere."""

import json
import math
import os
import shutil
import sys
import threading
import traceback
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file

import reftgraph as rg
import reftgraph.files.io
from reftgraph.files import current_folder

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

    spec = json.loads((current_folder(path) / "graph.json").read_text(), parse_constant=no_constants)
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
    tensors = load_file(str(current_folder(path) / "weights.safetensors"))
    unique_ops = {id(n.op): n.op for n in g.nodes}.values()
    assert sum(t.numel() for t in tensors.values()) == sum(
        t.numel() for op in unique_ops for t in op.state_dict().values())
    with safetensors.safe_open(str(current_folder(path) / "weights.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_saved_without_model(tmp_path, lm):
    g = every_op_graph()
    rg.save(g, tmp_path / "g")
    assert json.loads((current_folder(tmp_path / "g") / "graph.json").read_text())["model"] is None
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
    """Every file under ``path``: {relative name: bytes}."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_over_existing_replaces_it(tmp_path, lm):
    path = tmp_path / "g"
    g = every_op_graph()
    rg.save(g, path)
    small = rg.Graph()
    small.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="only")
    (path / "notes.txt").write_text("mine")
    rg.save(small, path)
    assert sorted(os.listdir(tmp_path)) == ["g"]
    assert sorted(os.listdir(path)) == ["CURRENT", "notes.txt", "versions"]  # other files are left alone
    assert sorted(os.listdir(current_folder(path))) == ["graph.json", "weights.safetensors"]
    assert [n.name for n in rg.load_graph(path).nodes] == ["only"]
    for _ in range(3):
        rg.save(small, path)
    assert len(os.listdir(path / "versions")) == 2  # the current version and the one before


def test_interrupted_save_keeps_the_old_graph(tmp_path, lm, monkeypatch):
    path = tmp_path / "g"
    g = every_op_graph()
    rg.save(g, path, model=lm)
    before = snapshot(path)

    def crash(tensors, filename, metadata=None):  # half a file, then the disk fills up
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(reftgraph.files.io, "save_file", crash)
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
    (current_folder(tmp_path / "g") / missing).unlink()
    with pytest.raises(rg.GraphFileError, match=f"is not a saved graph: {missing} is missing"):
        rg.load_graph(tmp_path / "g")


def test_corrupt_files_raise(saved, tmp_path):
    g, _ = saved
    rg.save(g, tmp_path / "g")
    weights = current_folder(tmp_path / "g") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(rg.GraphFileError, match="weights.safetensors"):
        rg.load_graph(tmp_path / "g")
    rg.save(g, tmp_path / "g")
    (current_folder(tmp_path / "g") / "graph.json").write_text("{not json")
    with pytest.raises(rg.GraphFileError, match="graph.json"):
        rg.load_graph(tmp_path / "g")


def test_missing_directory_raises(tmp_path):
    with pytest.raises(rg.GraphFileError):
        rg.load_graph(tmp_path / "nowhere")


def test_not_a_graph_raises(saved, tmp_path):
    g, _ = saved
    rg.save(g, tmp_path / "g")
    graph_json = current_folder(tmp_path / "g") / "graph.json"
    spec = json.loads(graph_json.read_text())
    spec["ops"][0]["type"] = "Evil"
    graph_json.write_text(json.dumps(spec))
    with pytest.raises(rg.GraphFileError, match="Evil"):
        rg.load_graph(tmp_path / "g")
    spec["format"] = "something else"
    graph_json.write_text(json.dumps(spec))
    with pytest.raises(rg.GraphFileError, match="format"):
        rg.load_graph(tmp_path / "g")


def two_graphs():
    a, b = rg.Graph(), rg.Graph()
    a.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="a")
    b.add(S("mlp_out", 1, positions=[0]), rg.Add(torch.ones(32)), name="b")
    return a, b


def names(path) -> tuple:
    """The node names of the graph at ``path``, or the error loading it gave."""
    try:
        return tuple(n.name for n in rg.load_graph(path).nodes)
    except Exception as e:  # noqa: BLE001 - any failure is recorded
        return (f"{type(e).__name__}: {e}",)


def test_a_folder_of_the_old_layout_loads_and_the_next_save_converts_it(tmp_path):
    a, b = two_graphs()
    path = tmp_path / "g"
    path.mkdir()
    rg.files.write_graph(path, a)  # graph.json and weights.safetensors directly inside, as before versions
    assert names(path) == ("a",)
    rg.save(b, path)
    assert sorted(os.listdir(path)) == ["CURRENT", "versions"] and names(path) == ("b",)


@pytest.mark.parametrize("pointer", ["../../etc/passwd", "", "20240101-000000-zzzzzzzzzzzz", "x" * 500])
def test_a_crafted_pointer_is_refused(tmp_path, pointer):
    path = rg.save(two_graphs()[0], tmp_path / "g")
    (path / "CURRENT").write_text(pointer)
    with pytest.raises(rg.GraphFileError, match="CURRENT holds .*, not the name of a saved version"):
        rg.load_graph(path)
    (path / "CURRENT").write_text("20240101-000000-0123456789ab")  # a version that is not there
    with pytest.raises(rg.GraphFileError, match="is not a saved graph: graph.json is missing"):
        rg.load_graph(path)
    rg.save(two_graphs()[1], path)  # a save repairs it
    assert names(path) == ("b",)


def test_every_state_a_save_passes_through_loads_whole(tmp_path, monkeypatch):
    """Deterministic: a load just before and just after every rename and removal that saves
    (A -> B -> A -> B) make; each finds graph A or graph B, whole."""
    a, b = two_graphs()
    path = tmp_path / "g"
    rg.save(a, path)
    seen, busy = [], []

    def load_around(fn):
        def wrapped(*args, **kwargs):
            if busy:  # the load's own calls
                return fn(*args, **kwargs)
            busy.append(1)
            try:
                seen.append(names(path))
                out = fn(*args, **kwargs)
                seen.append(names(path))
                return out
            finally:
                busy.pop()
        return wrapped

    for module, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, load_around(getattr(module, name)))
    for g in (b, a, b):
        rg.save(g, path)
    monkeypatch.undo()
    assert len(seen) >= 12 and set(seen) == {("a",), ("b",)}, sorted(set(seen))


@pytest.fixture
def switch_often():
    """Threads switch every 10 us (not 5 ms): many more interleavings of readers and writers."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_readers_never_miss_a_graph_while_it_is_replaced(tmp_path):
    """Two reader threads load in a loop while a writer replaces the graph 30 times."""
    a, b = two_graphs()
    path = tmp_path / "g"
    rg.save(a, path)
    done, loads = threading.Event(), []

    def reader():
        while not done.is_set() or len(loads) < 2:
            loads.append(names(path))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for k in range(30):
            rg.save((b, a)[k % 2], path)
    finally:
        done.set()
        for t in readers:
            t.join()
    assert set(loads) <= {("a",), ("b",)}, sorted(set(loads))
    assert sorted(os.listdir(tmp_path)) == ["g"] and len(os.listdir(path / "versions")) == 2


def test_a_reader_whose_version_was_removed_reads_the_pointer_again(tmp_path, monkeypatch):
    """A reader reads CURRENT, then two saves replace the graph (the second removes the
    version the reader was about to open): it reads CURRENT again and loads the newest graph."""
    a, b = two_graphs()
    path = tmp_path / "g"
    rg.save(a, path)
    real, folders = reftgraph.files.io._read, []

    def two_saves_first(folder):
        folders.append(folder)
        if len(folders) == 1:
            rg.save(b, path)
            rg.save(b, path)
        return real(folder)

    monkeypatch.setattr(reftgraph.files.io, "_read", two_saves_first)
    assert names(path) == ("b",)
    assert len(folders) == 2 and not folders[0].exists() and folders[1] == current_folder(path)


def in_child(fn) -> int:
    """Run ``fn`` in a forked child process; its pid (exit status 0 when ``fn`` returned)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def exit_status(pid: int, wait: bool = True):
    done, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_readers_never_miss_a_graph_replaced_by_another_process(tmp_path):
    a, b = two_graphs()
    path = tmp_path / "g"
    rg.save(a, path)
    pid = in_child(lambda: [rg.save((b, a)[k % 2], path) for k in range(40)])
    loads, status = [], None
    while status is None or len(loads) < 2:
        status = status if status is not None else exit_status(pid, wait=False)
        loads.append(names(path))
    assert status == 0
    assert set(loads) <= {("a",), ("b",)}, sorted(set(loads))


def test_a_second_writer_in_the_middle_of_a_save_waits_its_turn(tmp_path, monkeypatch):
    """Deterministic: at each rename a save makes, a second writer starts and is given 0.3 s
    (time enough to save); it waits for the first one instead of colliding, and both succeed."""
    a, b = two_graphs()
    path = tmp_path / "g"
    rg.save(a, path)
    real, main, seconds, errors = os.replace, threading.current_thread(), [], []

    def save_b():
        try:
            rg.save(b, path)
        except Exception as e:  # noqa: BLE001 - any failure is recorded
            errors.append(repr(e))

    def replace(src, dst):
        if threading.current_thread() is main:
            seconds.append(threading.Thread(target=save_b))
            seconds[-1].start()
            seconds[-1].join(0.3)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        rg.save(a, path)
    finally:
        for t in seconds:
            t.join()
        monkeypatch.undo()
    assert seconds and errors == []
    assert names(path) in {("a",), ("b",)}
    assert sorted(os.listdir(tmp_path)) == ["g"] and sorted(os.listdir(path)) == ["CURRENT", "versions"]


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_two_writers_at_once_both_succeed(tmp_path, how, switch_often):
    """Two writers save 15 times each into the same new path at once: no error, the last
    pointer wins, and no leftovers but the current version and the one before."""
    if how == "processes" and not hasattr(os, "fork"):
        pytest.skip("needs fork")
    a, b = two_graphs()
    path, errors = tmp_path / "g", []

    def writer(g):
        for _ in range(15):
            try:
                rg.save(g, path)
            except Exception as e:  # noqa: BLE001 - any failure is recorded
                errors.append(repr(e))
                raise

    if how == "threads":
        threads = [threading.Thread(target=writer, args=(g,)) for g in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        pid = in_child(lambda: writer(b))
        try:
            writer(a)
        finally:
            assert exit_status(pid) == 0
    assert errors == []
    assert names(path) in {("a",), ("b",)}
    assert sorted(os.listdir(tmp_path)) == ["g"] and sorted(os.listdir(path)) == ["CURRENT", "versions"]
    assert len(os.listdir(path / "versions")) == 2


# -- save refuses what load_graph would refuse, before writing anything -----------------------

class Double(rg.Op):
    """An op nobody registered."""

    def forward(self, h, source=None, valid=None):
        return 2 * h


class LoReFT(rg.LoReFT):
    """A subclass with the name of a registered op: it would load as reftgraph's LoReFT."""

    def forward(self, h, source=None, valid=None, **kwargs):
        return h


class MyAdd(rg.Add):
    """A subclass of a registered op with a name of its own, not registered."""


def one_node(op, site=None) -> rg.Graph:
    g = rg.Graph()
    g.add(site or S("resid_post", 0, positions="last"), op, name="x")
    return g


def nan_weight():
    op = rg.LoReFT(width=32, rank=2, seed=0)
    with torch.no_grad():
        op.weight[0, 1] = float("nan")
    return one_node(op)


def nested(depth: int):
    op = rg.Add(torch.ones(32))
    for _ in range(depth):
        op = rg.core.ops.Without(op, directions=torch.eye(32)[:1])
    return one_node(op)


SAVE_CASES = [
    ("nan_tensor", nan_weight, ["cannot save op 0 (LoReFT) of node 'x': tensor op0.weight holds NaN"]),
    ("inf_tensor", lambda: one_node(rg.Add(torch.full((32,), math.inf))),
     ["node 'x'", "op0.vector holds NaN or infinite"]),
    ("inf_config", lambda: one_node(rg.Add(torch.ones(32), scale=math.inf)),
     ["cannot save op 0 (Add) of node 'x': config scale = inf is not a finite JSON number"]),
    ("nan_config", lambda: one_node(rg.Add(torch.ones(32), scale=math.nan)), ["node 'x'", "scale = nan"]),
    ("int_tensor", lambda: one_node(rg.Set(torch.ones(32, dtype=torch.int64))),
     ["op 0 (Set) of node 'x': tensor op0.value has dtype torch.int64"]),
    ("int_config_beyond_64_bits", lambda: one_node(rg.Ablate("zero", seed=2**70)),
     ["op 0 (Ablate) of node 'x': config 'seed' = 1180591620717411303424 is out of range"]),
    ("custom_op", lambda: one_node(Double()), ["op 0 (Double) of node 'x': unknown op type 'Double'",
                                                "reftgraph.register_op"]),
    ("subclass_named_as_registered", lambda: one_node(LoReFT(width=32, rank=2)),
     [f"node 'x': its op is {__name__}.LoReFT, which is not registered: it would load as "
      "reftgraph.core.ops.reft.LoReFT", "register_op"]),
    ("subclass_unregistered", lambda: one_node(MyAdd(torch.ones(32))), ["unknown op type 'MyAdd'"]),
    ("subclass_inside_an_op", lambda: one_node(rg.core.ops.Without(LoReFT(width=32, rank=2), torch.eye(32)[:1])),
     [f"node 'x': its op inner is {__name__}.LoReFT"]),
    ("unregistered_inside_an_op", lambda: one_node(rg.core.ops.Without(Double(), torch.eye(32)[:1])),
     ["op 0.inner (Double) of node 'x': unknown op type 'Double'"]),
    ("nested_too_deep", lambda: nested(9), ["of node 'x': ops nested more than 8 deep"]),
]


@pytest.mark.parametrize("make, parts", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_save_refuses_what_would_not_load(tmp_path, make, parts):
    g = make()
    with pytest.raises(rg.GraphFileError) as err:
        rg.save(g, tmp_path / "new" / "g")
    for part in parts:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"
    assert os.listdir(tmp_path) == []  # nothing written, not even the folder
    path = rg.save(two_graphs()[0], tmp_path / "old")
    before = snapshot(path)
    with pytest.raises(rg.GraphFileError):
        rg.save(g, path)
    assert snapshot(path) == before  # a saved graph there stays as it was


def test_save_refuses_more_nodes_than_a_file_may_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(reftgraph.files.io, "MAX_NODES", 2)
    g = rg.reft_graph(rg.models.tiny("llama"), layers=[0, 1], positions="f1+l1", rank=2)
    with pytest.raises(rg.GraphFileError, match="cannot save a graph of 4 nodes; a saved graph holds at most 2"):
        rg.save(g, tmp_path / "g")
    assert os.listdir(tmp_path) == []


def test_a_nested_op_at_the_depth_limit_round_trips(tmp_path):
    g = nested(8)
    g2 = rg.load_graph(rg.save(g, tmp_path / "g"))
    h = torch.randn(2, 1, 32)
    assert torch.equal(g["x"].op(h), g2["x"].op(h))


# -- registering an op of your own -------------------------------------------------------------

class Scale(rg.Op):
    """h * factor, with a learned bias of the site's width."""

    def __init__(self, width: int, factor: float = 2.0):
        super().__init__()
        self.width, self.factor = width, factor
        self.bias = torch.nn.Parameter(torch.zeros(width))

    def config(self):
        return {"width": self.width, "factor": self.factor}

    def forward(self, h, source=None, valid=None):
        return h * self.factor + self.bias


@pytest.fixture
def registered():
    yield rg.core.ops.register_op(Scale)
    rg.core.ops.OPS.pop("Scale", None)


def test_a_registered_op_saves_and_loads(lm, tmp_path, registered):
    op = registered(32, factor=1.5)
    with torch.no_grad():
        op.bias.normal_()
    g = one_node(op)
    rg.save(g, tmp_path / "g", model=lm)
    g2 = rg.load_graph(tmp_path / "g", model=lm)
    assert type(g2["x"].op) is Scale and g2["x"].op.factor == 1.5
    assert torch.equal(g.run(lm, PROMPTS).logits, g2.run(lm, PROMPTS).logits)
    assert rg.core.ops.register_op(Scale) is Scale  # registering it again does nothing


def test_register_op_refuses_clashes_and_other_classes(registered):
    class Other(rg.Op):
        pass

    Other.__name__ = Other.__qualname__ = "Scale"
    with pytest.raises(rg.ReftgraphError, match="an op named 'Scale' is registered already .*test_io.Scale"):
        rg.core.ops.register_op(Other)
    with pytest.raises(rg.ReftgraphError, match="an op named 'LoReFT' is registered already"):
        rg.core.ops.register_op(LoReFT)
    for cls in (torch.nn.Linear, rg.Op, "Scale", Scale(4)):
        with pytest.raises(rg.ReftgraphError, match="register_op takes a subclass of reftgraph.Op"):
            rg.core.ops.register_op(cls)
    assert rg.core.ops.OPS["Scale"] is Scale and rg.core.ops.OPS["LoReFT"] is rg.LoReFT


# -- no pickle: the source checks are in test_safe_loading.py ----------------------------------

def test_io_text_has_no_pickle():
    text = Path(reftgraph.files.io.__file__).read_text()
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
