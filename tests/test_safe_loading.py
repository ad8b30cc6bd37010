"""Loading never runs code from a file: crafted ``graph.json`` and ``weights.safetensors`` files
are refused with a clear error, before any tensor is read, nothing outside the registered ops
is imported or called, and saves killed midway leave the previous graph intact. The no-pickle
source checks are here too."""

import ast
import functools
import json
import os
import pickle
import resource
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reftgraph as rg
import reftgraph.files.io
import reftgraph.files.versions

PROMPTS = ["hello world", "a cat"]
SOURCES = {"source": ["one two", "three"]}
S = rg.Site


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")


def small_graph() -> rg.Graph:
    """Three ops: op0 LoReFT, op1 Add (its vector is a constructor tensor), op2 Patch."""
    g = rg.Graph()
    g.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=2, seed=0), name="lo")
    g.add(S("mlp_out", 1, positions=[0]), rg.Add(torch.arange(32.0) / 32, scale=0.5), name="add")
    g.add(S("resid_pre", 1, positions="last"), rg.Patch("source"), name="patch")
    with torch.no_grad():
        g["lo"].op.bias.fill_(0.3)
    return g


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("safe") / "g"
    rg.save(small_graph(), path, model=lm)
    return path


def files(path: Path) -> Path:
    """The folder holding a saved graph's graph.json and weights.safetensors."""
    return rg.files.current_folder(path)


def craft(saved: Path, tmp_path: Path, spec=None, tensors=None) -> Path:
    """A copy of the saved graph (as a folder of the old layout: graph.json and
    weights.safetensors directly inside) with a replaced graph.json (text or object) and/or tensors."""
    out = tmp_path / "crafted"
    out.mkdir()
    spec = (files(saved) / "graph.json").read_text() if spec is None else spec
    (out / "graph.json").write_bytes(spec if isinstance(spec, bytes) else spec.encode())
    if tensors is None:
        (out / "weights.safetensors").write_bytes((files(saved) / "weights.safetensors").read_bytes())
    elif isinstance(tensors, bytes):
        (out / "weights.safetensors").write_bytes(tensors)
    else:
        save_file(tensors, str(out / "weights.safetensors"))
    return out


def edit(path: str, value):
    """A change to graph.json: set the value at a '/'-separated path (``DELETE`` removes it)."""
    def apply(spec):
        *parents, last = path.split("/")
        d = spec
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        last = int(last) if isinstance(d, list) else last
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
        return spec
    return apply


DELETE = object()


def nested(op: dict, depth: int) -> dict:
    """``op`` wrapped in ``depth`` Withouts (each an op inside the next one's config)."""
    for _ in range(depth):
        op = {"type": "Without", "config": {"inner": op}}
    return op

SPEC_CASES = [
    # op types: looked up in the registry by name, nothing imported
    ("type_unknown", edit("ops/0/type", "Evil"), ["unknown op type 'Evil'", "registered op types", "LoReFT"]),
    ("type_dunder", edit("ops/0/type", "__class__"), ["unknown op type '__class__'"]),
    ("type_module_path", edit("ops/0/type", "os.system"), ["unknown op type 'os.system'"]),
    ("type_qualified_op", edit("ops/0/type", "reftgraph.core.ops.basic.Patch"), ["unknown op type"]),
    ("type_builtin", edit("ops/0/type", "builtins.eval"), ["unknown op type 'builtins.eval'"]),
    ("type_base_class", edit("ops/0/type", "Op"), ["unknown op type 'Op'"]),
    ("type_list", edit("ops/0/type", ["LoReFT"]), ["unknown op type"]),
    ("type_object", edit("ops/0/type", {"__class__": "LoReFT"}), ["unknown op type"]),
    # config: known parameters, JSON scalars, sane values
    ("config_dunder_key", edit("ops/0/config/__class__", "os.system"), ["op 0 (LoReFT)", "unknown config key '__class__'"]),
    ("config_unknown_key", edit("ops/0/config/device", "cuda"), ["unknown config key 'device'"]),
    ("config_object_value", edit("ops/0/config/act", {"__import__": "os"}), ["config 'act' must be a number, string"]),
    ("config_list_value", edit("ops/1/config/scale", [1, 2]), ["op 1 (Add)", "config 'scale' must be a number"]),
    ("config_act_path", edit("ops/0/config/act", "os.system"), ["cannot build", "unknown activation 'os.system'"]),
    ("config_huge_width", edit("ops/0/config/width", 10**15), ["tensor op0.rotate has shape [32, 2]",
                                                                 "needs [1000000000000000, 2]"]),
    ("config_beyond_int64", edit("ops/0/config/seed", 2**70), ["config 'seed'", "out of range"]),
    ("config_negative_rank", edit("ops/0/config/rank", -2), ["cannot build", "rank must be an int in 1..32"]),
    ("config_width_text", edit("ops/0/config/width", "32"), ["cannot build"]),
    ("config_bool_for_int", edit("ops/0/config/rank", True), ["config 'rank' = True has the wrong type"]),
    ("config_int_for_bool", edit("ops/1/config/trainable", 1), ["config 'trainable' = 1 has the wrong type"]),
    ("config_huge_float", ('"scale": 0.5', '"scale": 1e400'), ["config 'scale' = inf is out of range"]),
    ("config_missing_width", edit("ops/0/config/width", DELETE), ["op 0 (LoReFT)", "missing ['width']"]),
    ("config_not_mapping", edit("ops/0/config", "width=32"), ["config not a mapping"]),
    ("patch_site_extra_key", edit("ops/2/config/site", {"component": "resid_pre", "layer": 0, "code": "x"}),
     ["op 2 (Patch)", "config 'site'", "a site must be a mapping with 'component' and 'layer'"]),
    ("patch_source_number", edit("ops/2/config/source", 3), ["node 'patch'", "source= must be a stream name"]),
    # nodes
    ("node_op_negative", edit("nodes/0/op", -1), ["node 'lo': op index must be an int in 0..2", "-1"]),
    ("node_op_bool", edit("nodes/0/op", True), ["op index must be an int in 0..2"]),
    ("node_op_beyond", edit("nodes/0/op", 3), ["op index must be an int in 0..2", "3"]),
    ("node_extra_key", edit("nodes/0/eval", "1"), ["graph.json node 0 must be a mapping with exactly the keys"]),
    ("node_component_dunder", edit("nodes/0/site/component", "__class__"), ["unknown component '__class__'"]),
    ("node_site_extra_key", edit("nodes/0/site/__init__", 1), ["a site must be a mapping with 'component'"]),
    ("node_layer_text", edit("nodes/0/site/layer", "0"), ["layer must be an int", "got '0'"]),
    ("node_positions_slice", edit("nodes/0/site/positions", {"slice": "0:3"}), ["{'slice': [start, stop, step]}"]),
    ("node_name_dot", edit("nodes/0/name", "a.b"), ["node name 'a.b'"]),
    ("node_stream_number", edit("nodes/0/stream", 0), ["stream must be a non-empty string"]),
    ("op_unused", edit("nodes/2/op", 0), ["ops [2] are not used by any node"]),
    ("node_positions_beyond_int64", edit("nodes/0/site/positions", [2**63 + 5]), ["graph.json node 'lo': ",
                                                                                   "positions"]),
    ("node_slice_step_huge", edit("nodes/0/site/positions", {"slice": [0, None, 2**62]}),
     ["graph.json node 'lo': ", "slice"]),
    # sizes: refused before anything is built
    ("too_many_nodes", lambda s: dict(s, nodes=[dict(s["nodes"][0], name=f"n{k}") for k in range(10_001)]),
     ["graph.json has 10001 nodes; a saved graph holds at most 10000"]),
    ("more_ops_than_nodes", lambda s: dict(s, ops=s["ops"] + [s["ops"][2]] * 5),
     ["graph.json has 8 ops for 3 nodes"]),
    ("ops_nested_too_deep", lambda s: dict(s, ops=s["ops"][:2] + [nested(s["ops"][2], 300)]),
     ["op 2.inner.inner.inner.inner.inner.inner.inner.inner.inner (Without) of node 'patch'",
      "ops nested more than 8 deep"]),
    # the file as a whole
    ("top_extra_key", edit("exec", "print(1)"), ["exactly the keys ['format', 'version', 'model', 'ops', 'nodes']"]),
    ("top_missing_nodes", edit("nodes", DELETE), ["exactly the keys"]),
    ("format", edit("format", "pickle"), ["not a reftgraph graph (format 'pickle'"]),
    ("version_newer", edit("version", 99), ["graph format version 99 is newer"]),
    ("version_text", edit("version", "1"), ["version must be an int"]),
    ("model_info_type", edit("model/d_model", "32"), ["'model': d_model must be an int"]),
    ("top_list", "[1, 2, 3]", ["not a reftgraph graph"]),
    ("nan_constant", ('"scale": 0.5', '"scale": NaN'), ["not valid JSON", "NaN is not a JSON number"]),
    ("duplicate_top_key", ('"version": 1,', '"version": 1, "version": 1,'), ["graph.json is not valid JSON",
                                                                           "duplicate key 'version'"]),
    ("duplicate_config_key", ('"scale": 0.5', '"scale": 0.5, "scale": 9.0'), ["duplicate key 'scale'"]),
    ("malformed", '{"format": "reftgraph-graph", ', ["graph.json is not valid JSON"]),
    ("deep_nesting", "[" * 100000 + "]" * 100000, ["graph.json is not valid JSON"]),
    ("huge_int", '{"version": ' + "9" * 5000 + "}", ["graph.json is not valid JSON"]),
    ("not_utf8", b"\xff\xfe\x00{", ["not valid JSON"]),
]


def _spec_text(saved: Path, change):
    """``change``: the whole file (str or bytes), an (old, new) text replacement, or a function of the spec."""
    text = (files(saved) / "graph.json").read_text()
    if isinstance(change, (str, bytes)):
        return change
    if isinstance(change, tuple):
        assert change[0] in text
        return text.replace(*change)
    return json.dumps(change(json.loads(text)))


@pytest.mark.parametrize("change, parts", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_crafted_graph_json_is_refused(saved, tmp_path, change, parts):
    path = craft(saved, tmp_path, spec=_spec_text(saved, change))
    modules = set(sys.modules)
    with pytest.raises(rg.GraphFileError) as err:
        rg.load_graph(path)
    assert set(sys.modules) == modules, "loading imported a module"
    for part in parts:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_a_valid_file_passes_the_same_checks(lm, saved, tmp_path):
    """The crafted cases start from a file that loads and runs bit-exactly."""
    path = craft(saved, tmp_path, spec=_spec_text(saved, edit("ops/0/config/act", "identity")))
    g, g2 = small_graph(), rg.load_graph(path, model=lm)
    assert torch.equal(g.run(lm, PROMPTS, sources=SOURCES).logits, g2.run(lm, PROMPTS, sources=SOURCES).logits)


def test_the_config_of_a_huge_op_allocates_nothing(saved, tmp_path, monkeypatch):
    """A width of 10**15 (4 PB of weights) is refused from shapes alone: the op is only built on 'meta'."""
    devices, real_init = [], rg.LoReFT.__init__

    @functools.wraps(real_init)  # keeps the signature the loader checks config keys against
    def init(self, *args, **kwargs):
        devices.append(torch.get_default_device().type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(rg.LoReFT, "__init__", init)
    path = craft(saved, tmp_path, spec=_spec_text(saved, edit("ops/0/config/width", 10**15)))
    with pytest.raises(rg.GraphFileError, match="shape"):
        rg.load_graph(path)
    assert devices == ["meta"]


# -- weights.safetensors ------------------------------------------------------------------------

def tensors_with(saved, change):
    tensors = load_file(str(files(saved) / "weights.safetensors"))
    change(tensors)
    return tensors


TENSOR_CASES = [
    ("missing", lambda t: t.pop("op0.weight"), ["op 0 (LoReFT) of node 'lo': weights missing ['op0.weight']"]),
    ("missing_constructor_tensor", lambda t: t.pop("op1.vector"), ["op 1 (Add) of node 'add': missing ['vector']"]),
    ("extra_in_op", lambda t: t.update({"op0.evil": torch.zeros(1)}), ["unexpected ['op0.evil']"]),
    ("extra_name", lambda t: t.update({"evil": torch.zeros(1)}), ["unexpected tensor 'evil'", "op0..op2"]),
    ("extra_op_index", lambda t: t.update({"op9.bias": torch.zeros(1)}), ["unexpected tensor 'op9.bias'"]),
    ("padded_index", lambda t: t.update({"op00.bias": t["op0.bias"].clone()}), ["unexpected tensor 'op00.bias'"]),
    ("wrong_shape", lambda t: t.update({"op0.rotate": torch.zeros(32, 3)}),
     ["tensor op0.rotate has shape [32, 3]", "needs [32, 2]"]),
    ("int_dtype", lambda t: t.update({"op0.bias": torch.zeros(2, dtype=torch.int64)}),
     ["tensor op0.bias has dtype torch.int64", "floating-point"]),
    ("bool_dtype", lambda t: t.update({"op1.vector": torch.zeros(32, dtype=torch.bool)}), ["torch.bool"]),
    ("mixed_dtypes", lambda t: t.update({"op0.bias": t["op0.bias"].half()}), ["several dtypes"]),
    ("nan", lambda t: t["op0.weight"].__setitem__((0, 0), float("nan")), ["op0.weight holds NaN or infinite"]),
    ("inf", lambda t: t["op1.vector"].__setitem__(3, float("inf")), ["op1.vector holds NaN or infinite"]),
    ("float8", lambda t: t.update({"op0.bias": t["op0.bias"].to(torch.float8_e4m3fn)}),
     ["weights.safetensors: tensor 'op0.bias' has dtype 'F8_E4M3'", "F16, BF16, F32, F64"]),
    ("float8_whole_op", lambda t: t.update({k: v.to(torch.float8_e5m2) for k, v in t.items() if k.startswith("op0")}),
     ["has dtype 'F8_E5M2'"]),
]


@pytest.mark.parametrize("change, parts", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_crafted_tensors_are_refused(lm, saved, tmp_path, change, parts):
    path = craft(saved, tmp_path, tensors=tensors_with(saved, change))
    with pytest.raises(rg.GraphFileError) as err:
        rg.load_graph(path, model=lm)
    for part in parts:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


@pytest.mark.parametrize("keep", [0, 7, 60, -1])
def test_truncated_weights_are_refused(saved, tmp_path, keep):
    data = (files(saved) / "weights.safetensors").read_bytes()
    path = craft(saved, tmp_path, tensors=data[:keep if keep >= 0 else len(data) - 1])
    with pytest.raises(rg.GraphFileError, match="weights.safetensors cannot be read"):
        rg.load_graph(path)


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """A safetensors file from a header (a mapping, or JSON text as is) and the data bytes."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entries(saved) -> tuple[dict, bytes]:
    """The saved weights' header (without __metadata__) and data bytes."""
    raw = (files(saved) / "weights.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


def with_entry(saved, name, dtype, shape, offsets):
    header, data = entries(saved)
    return safetensors_bytes(dict(header, **{name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}), data)


HEADER_CASES = [
    ("duplicate_name", lambda saved: safetensors_bytes(
        json.dumps(entries(saved)[0])[:-1] + ', "op0.bias": ' + json.dumps(entries(saved)[0]["op0.bias"]) + "}",
        entries(saved)[1]), ["weights.safetensors (its header) is not valid JSON", "duplicate key 'op0.bias'"]),
    ("beyond_the_end", lambda saved: with_entry(saved, "op0.extra", "F32", [4], [0, 10**6]),
     ["weights.safetensors cannot be read: tensor 'op0.extra'", "data offsets [0, 1000000]"]),
    ("size_mismatch", lambda saved: with_entry(saved, "op0.extra", "F32", [3], [0, 8]),
     ["tensor 'op0.extra' of shape [3] (F32) needs 12 bytes, its data offsets span 8"]),
    ("unknown_dtype", lambda saved: with_entry(saved, "op0.extra", "C64", [1], [0, 8]), ["dtype 'C64'"]),
    ("header_over_the_file", lambda saved: struct.pack("<Q", 2**40) + b"{}",
     ["declare a header of 1099511627776 bytes"]),
    ("header_not_an_object", lambda saved: safetensors_bytes("[1, 2]"), ["the header is not a JSON object"]),
    ("metadata_not_text", lambda saved: safetensors_bytes({"__metadata__": {"a": 1}}), ["__metadata__"]),
    ("shape_overflow", lambda saved: with_entry(saved, "op0.extra", "F32", [0, 2**62, 2**62], [0, 0]),
     ["tensor 'op0.extra' has shape [0, 4611686018427387904, 4611686018427387904]"]),
]


@pytest.mark.parametrize("make, parts", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_crafted_headers_are_refused(saved, tmp_path, make, parts):
    path = craft(saved, tmp_path, tensors=make(saved))
    with pytest.raises(rg.GraphFileError) as err:
        rg.load_graph(path)
    for part in parts:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_a_huge_extra_tensor_is_refused_from_the_header_alone(saved, tmp_path, monkeypatch):
    """A 4 KB sparse file whose header declares a 1 GiB extra tensor: refused by its name
    before any tensor is read (no time, no memory), not after reading and checking it all."""
    end = len(entries(saved)[1])  # after the real tensors, as a writer would put it
    path = craft(saved, tmp_path, tensors=with_entry(saved, "op0.evil", "F32", [2**28], [end, end + 2**30]))
    with open(path / "weights.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) + 2**30)  # a hole: nothing on disk, zeros when read
    reads = []
    monkeypatch.setattr(reftgraph.files.io, "read_tensors", lambda *a: reads.append(a))
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(rg.GraphFileError, match=r"op 0 \(LoReFT\).*: weights missing \[\], unexpected \['op0.evil'\]"):
        rg.load_graph(path)
    assert reads == []
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing near 1 GiB


def test_only_the_expected_tensors_are_read(saved, tmp_path, monkeypatch):
    names, real = [], reftgraph.files.io.read_tensors
    monkeypatch.setattr(reftgraph.files.io, "read_tensors", lambda f, header, wanted: (names.extend(wanted),
                                                                                 real(f, header, wanted))[1])
    rg.load_graph(saved)
    assert sorted(names) == sorted(entries(saved)[0])


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_pickle_is_never_unpickled(saved, tmp_path):
    marker = tmp_path / "ran.txt"
    payload = pickle.dumps(Payload(marker))
    path = craft(saved, tmp_path, tensors=payload)
    with pytest.raises(rg.GraphFileError, match="weights.safetensors cannot be read"):
        rg.load_graph(path)
    (path / "graph.json").write_bytes(payload)
    (path / "weights.safetensors").write_bytes((files(saved) / "weights.safetensors").read_bytes())
    with pytest.raises(rg.GraphFileError, match="graph.json is not valid JSON"):
        rg.load_graph(path)
    (path / "graph.json").write_bytes((files(saved) / "graph.json").read_bytes())
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, path / "weights.safetensors")  # a .bin in disguise
    with pytest.raises(rg.GraphFileError, match="cannot be read"):
        rg.load_graph(path)
    assert not marker.exists()


def test_half_precision_ops_round_trip(lm, tmp_path):
    g = small_graph()
    g.ops.to(torch.bfloat16)
    rg.save(g, tmp_path / "g")
    g2 = rg.load_graph(tmp_path / "g", model=lm)
    assert g2["lo"].op.rotate.dtype == torch.bfloat16
    for node in g.nodes:
        a, b = node.op.state_dict(), g2[node.name].op.state_dict()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_saved_for_another_width_is_refused_before_any_forward(lm, tmp_path):
    wide = rg.models.tiny("llama", hidden_size=64, intermediate_size=96)
    rg.save(rg.reft_graph(wide, layers=[0], rank=2), tmp_path / "g", model=wide)
    calls = []
    handle = lm.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(rg.GraphFileError, match=r"saved for 'tiny-llama' \(d_model 64\), not 'tiny-llama' \(d_model 32\)"):
            rg.load_graph(tmp_path / "g", model=lm)
        spec = json.loads((files(tmp_path / "g") / "graph.json").read_text())
        spec["model"] = None  # without the model info, the widths of the ops still give it away
        (files(tmp_path / "g") / "graph.json").write_text(json.dumps(spec))
        with pytest.raises(rg.SiteError, match="LoReFT has width 64, the site needs 32"):
            rg.load_graph(tmp_path / "g", model=lm)
    finally:
        handle.remove()
    assert calls == []


# -- crash-safe saving ----------------------------------------------------------------------------

def snapshot(path: Path) -> dict:
    """Every file under ``path``: {relative name: bytes}."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def killed_save(path: Path, when: str) -> None:
    """Save a new graph over ``path`` in a forked child that dies by SIGKILL ``when`` it is
    'writing' its weights (half of the file is on disk) or 'pointing' (its version is
    complete, the new pointer written but not yet renamed over ``CURRENT``)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real_save_file, real_replace = reftgraph.files.io.save_file, os.replace

            def half_then_wait(tensors, filename, metadata=None):
                real_save_file(tensors, filename, metadata=metadata)
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                os.write(write, b"w")
                time.sleep(60)

            def replace(src, dst):
                if Path(dst).name == "CURRENT":
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)

            if when == "writing":
                reftgraph.files.io.save_file = half_then_wait
            else:
                os.replace = replace
            g = rg.Graph()
            g.add(S("resid_post", 0, positions="last"), rg.LoReFT(width=32, rank=4, seed=9), name="new")
            rg.save(g, path)
        finally:
            os._exit(3)
    os.close(write)
    if when == "writing":
        assert os.read(read, 1) == b"w"
        os.kill(pid, signal.SIGKILL)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
@pytest.mark.parametrize("when", ["writing", "pointing"])
def test_a_save_killed_midway_keeps_the_previous_graph(lm, tmp_path, when):
    """A save over an existing graph is killed with SIGKILL; the previous graph loads
    afterwards, bit-exact, and the next save removes what the dead one left."""
    g = small_graph()
    path = tmp_path / "g"
    rg.save(g, path, model=lm)
    before = snapshot(path)
    killed_save(path, when)
    after = snapshot(path)
    assert {k: v for k, v in after.items() if k in before} == before  # the previous graph was not touched
    left = sorted(set(after) - set(before))  # the dead save's unfinished version (and its pointer)
    assert left and all(k.startswith(("versions/", ".CURRENT-")) for k in left), left
    assert any(k.startswith(".CURRENT-") for k in left) == (when == "pointing")
    g2 = rg.load_graph(path, model=lm)  # reading writes nothing
    assert snapshot(path) == after and leftovers(tmp_path) == []
    assert list(g2.dag) == ["lo", "add", "patch"]
    assert torch.equal(g2.run(lm, PROMPTS, sources=SOURCES).logits, g.run(lm, PROMPTS, sources=SOURCES).logits)
    rg.save(g, path, model=lm)  # removes them: it holds the lock, so their writer is dead (no process ids)
    assert sorted(os.listdir(path)) == ["CURRENT", "versions"] and len(os.listdir(path / "versions")) == 2
    assert not set(left) & set(snapshot(path))


def test_a_failed_pointer_update_keeps_the_previous_graph(lm, tmp_path, monkeypatch):
    path = tmp_path / "g"
    rg.save(small_graph(), path)
    before = snapshot(path)
    real = os.replace

    def fail_on_the_pointer(src, dst):
        if Path(dst).name == "CURRENT":
            raise OSError("simulated failure")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_pointer)
    with pytest.raises(OSError, match="simulated"):
        rg.save(rg.reft_graph(lm, layers=[1], rank=2), path)
    monkeypatch.undo()
    assert snapshot(path) == before and leftovers(tmp_path) == []


def test_a_folder_moved_aside_by_a_killed_writer_comes_back_whatever_the_process_ids(lm, tmp_path):
    """A folder written by ``atomic_dir`` (as checkpoints are) whose writer was killed between
    its two renames: the previous folder sits in ``.g.old-<pid>-*`` beside the missing ``g``.
    The pid is one of a live process (a restarted container reuses pids; here: this one). A
    reader puts it back as soon as no writer holds the parent's lock; not while one does."""
    path, g = tmp_path / "g", small_graph()
    old = tmp_path / f".g.old-{os.getpid()}-x1"
    (old / "g").mkdir(parents=True)
    rg.files.write_graph(old / "g", g, lm)
    (tmp_path / f".g.tmp-{os.getpid()}-x2").mkdir()
    with reftgraph.files.versions.locked(tmp_path):  # a writer at work: its folders are left alone
        with pytest.raises(rg.GraphFileError, match="graph.json is missing"):
            rg.load_graph(path)
        assert len(leftovers(tmp_path)) == 2
    g2 = rg.load_graph(path, model=lm)
    assert leftovers(tmp_path) == [] and sorted(os.listdir(path)) == ["graph.json", "weights.safetensors"]
    assert torch.equal(g2.run(lm, PROMPTS, sources=SOURCES).logits, g.run(lm, PROMPTS, sources=SOURCES).logits)


# -- no pickle in the package -----------------------------------------------------------------------

PACKAGE = Path(reftgraph.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return [(p.relative_to(PACKAGE.parent).as_posix(), ast.parse(p.read_text(), filename=str(p))) for p in files]


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_no_pickle_imports():
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(name, a.name) for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append((name, node.module))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    node.value.id in UNSAFE_MODULES):
                found.append((name, f"{node.value.id}.{node.attr}"))
    assert found == []


def test_torch_load_only_with_weights_only():
    calls = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and (
                        f.value.id == "torch"):
                    calls.append((name, _keyword(node, "weights_only")))
                if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and (
                        f.value.id in ("np", "numpy")):
                    assert _keyword(node, "allow_pickle") is not True, name
    assert {name for name, _ in calls} <= {"reftgraph/files/pyreft.py", "reftgraph/files/dictionaries.py"}, calls
    assert all(weights_only is True for _, weights_only in calls), calls
    # and no other spelling of torch.load (from torch import load, torch.serialization.load)
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                assert "load" not in {a.name for a in node.names}, name
            if isinstance(node, ast.Attribute) and node.attr == "serialization":
                raise AssertionError(f"{name} uses torch.serialization")


@pytest.mark.parametrize("module", ["io", "header", "versions"])
def test_the_loader_calls_nothing_dynamic(module):
    """The loader has no eval/exec/import by name/getattr by name: op types come from a dict."""
    tree = ast.parse((PACKAGE / "files" / f"{module}.py").read_text())
    banned = {"eval", "exec", "compile", "__import__", "getattr", "import_module", "locate", "globals", "vars"}
    used = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}
    assert used & banned == set()
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and any(a.name in ("importlib", "pydoc", "runpy") for a in n.names)]
