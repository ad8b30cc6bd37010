"""The bad-input matrix: sites, positions, heads, subspaces, ops, graph composition, run and
generate inputs, datasets, training arguments, save/load and CLI specs. Every case must raise
a clear error that says what is wrong and what is valid, before the model runs a forward pass
(a pre-hook on the transformers model counts forward passes). test_validation.py holds the
cases that check node names, sites and ranges in detail."""

import json

import pytest
import torch

import reftgraph as rg
from reftgraph.data import Classification, PromptResponse, collate_lm
from reftgraph.core.ops.rotate import Rotate
from reftgraph.cli.spec import SpecError, read_rows, read_spec

PROMPTS = ["hello", "hi"]  # 5 and 2 tokens with the tiny byte-level tokenizer
S = rg.Site


@pytest.fixture(scope="module")
def lm():
    return rg.models.tiny("llama")  # 2 layers, width 32, 4 heads, 2 kv heads, head_dim 8, mlp 48


def one(site, op, name="n", **kwargs):
    g = rg.Graph()
    g.add(site, op, name=name, **kwargs)
    return g


def reft(lm):
    return rg.reft_graph(lm, layers=[0], positions="last", rank=2)


def cls_graph():
    return one(S("resid_post", -1, positions="last"), rg.Classify(32, 2), name="cls")


DATA = PromptResponse([("ab", "cd"), ("abc", "d")])


def train(lm, graph=None, data=DATA, **kwargs):
    return rg.train(reft(lm) if graph is None else graph, lm, data, progress=False, **kwargs)


# (id, call(lm, tmp_path), exception type, parts the message must hold)
CASES = [
    # -- sites ---------------------------------------------------------------------------
    ("layer_float", lambda lm, p: S("resid_post", 1.0), rg.SiteError, ["layer must be an int", "1.0"]),
    ("layer_bool", lambda lm, p: S("resid_post", True), rg.SiteError, ["layer must be an int", "True"]),
    ("component_case", lambda lm, p: S("Resid_Post", 0), rg.SiteError,
     ["unknown component 'Resid_Post'", "valid components: resid_pre"]),
    ("layer_huge", lambda lm, p: one(S("resid_post", 10**9, positions="last"), rg.Collect()).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "layer 1000000000 out of range", "valid layers 0..1"]),
    # -- positions -------------------------------------------------------------------------
    ("positions_float", lambda lm, p: S("resid_post", 0, positions=1.5), rg.SiteError,
     ["positions must be ints, a slice or a string", "float"]),
    ("positions_none", lambda lm, p: S("resid_post", 0, positions=None), rg.SiteError,
     ["positions must be ints, a slice or a string", "NoneType"]),
    ("positions_empty", lambda lm, p: S("resid_post", 0, positions=[]), rg.SiteError,
     ["non-empty list of ints", "[]"]),
    ("positions_repeat", lambda lm, p: S("resid_post", 0, positions=[1, 1]), rg.SiteError,
     ["positions [1, 1] repeat an entry"]),
    ("positions_nested", lambda lm, p: S("resid_post", 0, positions=[[0]]), rg.SiteError,
     ["non-empty list of ints", "[[0]]"]),
    ("slice_step_zero", lambda lm, p: S("resid_post", 0, positions=slice(0, 3, 0)), rg.SiteError,
     ["position slices need a positive step"]),
    ("slice_step_negative", lambda lm, p: S("resid_post", 0, positions=slice(None, None, -1)), rg.SiteError,
     ["position slices need a positive step"]),
    ("slice_str_bounds", lambda lm, p: S("resid_post", 0, positions=slice("a", None)), rg.SiteError,
     ["a position slice takes ints or None", "'a'"]),
    ("f0_l0", lambda lm, p: S("resid_post", 0, positions="f0+l0"), rg.SiteError,
     ["'f0+l0' select no token", "N >= 1 or M >= 1"]),
    ("position_negative_beyond", lambda lm, p: one(S("resid_post", 0, positions=[-6]), rg.Collect()).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "positions [-6] are beyond the prompt of row 0", "valid positions 0..4 or -5..-1"]),
    # -- heads -----------------------------------------------------------------------------
    ("head_bool", lambda lm, p: S("head_out", 0, head=True), rg.SiteError,
     ["head must be an int or a tuple of distinct ints", "True"]),
    ("head_repeat", lambda lm, p: S("head_out", 0, head=(1, 1)), rg.SiteError,
     ["head must be an int or a tuple of distinct ints", "(1, 1)"]),
    ("head_str", lambda lm, p: S("q", 0, head="01"), rg.SiteError, ["head must be an int or a tuple", "'01'"]),
    ("head_negative", lambda lm, p: one(S("head_out", 0, head=-1, positions="last"), rg.Collect()).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "head -1 out of range", "head_out has 4 heads: valid heads 0..3"]),
    ("head_on_mlp", lambda lm, p: S("mlp_out", 0, head=0), rg.SiteError,
     ["mlp_out has no heads", "head= is only for head_out, q, k, v"]),
    # -- subspaces -------------------------------------------------------------------------
    ("subspace_negative", lambda lm, p: S("resid_post", 0, subspace=(-1,)), rg.SiteError,
     ["subspace must be distinct non-negative dims", "(-1,)"]),
    ("subspace_empty", lambda lm, p: S("resid_post", 0, subspace=()), rg.SiteError,
     ["subspace must be distinct non-negative dims"]),
    ("subspace_bool", lambda lm, p: S("resid_post", 0, subspace=(True,)), rg.SiteError,
     ["subspace must be distinct non-negative dims"]),
    ("subspace_beyond_rotate_rank", lambda lm, p: one(
        S("resid_post", 0, positions="last", subspace=(5,)), Rotate(width=32, k=1, rank=4)).run(
        lm, PROMPTS, sources={"source": ["abcde", "xy"]}),
     rg.SiteError, ["node 'n'", "subspace dim 5 beyond the rank of Rotate", "valid dims 0..3"]),
    ("subspace_on_head_beyond_head_dim", lambda lm, p: one(
        S("q", 0, head=0, positions="last", subspace=(8,)), rg.Ablate()).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "subspace dim 8 beyond the width of q", "valid dims 0..7"]),
    # -- ops ---------------------------------------------------------------------------------
    ("reft_rank_zero", lambda lm, p: rg.LoReFT(width=32, rank=0), ValueError, ["rank must be an int in 1..32", "got 0"]),
    ("reft_rank_above_width", lambda lm, p: rg.LoReFT(width=32, rank=33), ValueError, ["rank must be an int in 1..32"]),
    ("reft_width_string", lambda lm, p: rg.LoReFT(width="32", rank=2), ValueError, ["LoReFT", "width must be an int >= 1", "'32'"]),
    ("reft_rank_float", lambda lm, p: rg.ConsReFT(width=32, rank=1.0), ValueError, ["ConsReFT", "rank must be an int in 1..32", "1.0"]),
    ("rotate_k_string", lambda lm, p: rg.Rotate(width=32, k="2"), ValueError, ["Rotate", "k must be an int >= 1"]),
    ("classify_classes_zero", lambda lm, p: rg.Classify(width=32, n_classes=0), ValueError, ["Classify", "n_classes"]),
    ("reft_unknown_act", lambda lm, p: rg.LoReFT(width=32, rank=2, act="swish"), ValueError,
     ["unknown activation 'swish'", "'gelu'", "'relu'"]),
    ("reft_dropout", lambda lm, p: rg.LoReFT(width=32, rank=2, dropout=1.5), ValueError, ["between 0 and 1", "1.5"]),
    ("ablate_mode", lambda lm, p: rg.Ablate("mean_of_batch"), ValueError,
     ["Ablate mode must be one of ('zero', 'mean', 'resample')", "'mean_of_batch'"]),
    ("rotate_k_above_rank", lambda lm, p: Rotate(width=32, k=5, rank=4), ValueError, ["k must be in 1..4", "got 5"]),
    ("reft_on_head_width", lambda lm, p: one(S("head_out", 0, head=0, positions="last"),
                                             rg.LoReFT(width=32, rank=2)).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "LoReFT has width 32, the site needs 8", "head_out width"]),
    ("classify_width", lambda lm, p: one(S("mlp_act", -1, positions="last"), rg.Classify(32, 2)).run(lm, PROMPTS),
     rg.SiteError, ["node 'n'", "Classify has width 32, the site needs 48"]),
    ("patch_source_none", lambda lm, p: one(S("resid_post", 0), rg.Patch(source=None)), rg.SiteError,
     ["node 'n'", "Patch reads another stream", "source= must be a stream name", "None"]),
    ("rotate_source_empty", lambda lm, p: one(S("resid_post", 0), Rotate(width=32, source="")), rg.SiteError,
     ["node 'n'", "Rotate reads another stream", "''"]),
    ("patch_site_str", lambda lm, p: one(S("resid_post", 1), rg.Patch(site="resid_pre")), rg.SiteError,
     ["node 'n'", "Patch(site=...) must be a reftgraph.Site", "str"]),
    ("patch_source_other_width", lambda lm, p: one(
        S("resid_post", 1, positions="last"), rg.Patch(site=S("mlp_act", 0, positions="last"))).run(
        lm, PROMPTS, sources={"source": ["ab", "cd"]}),
     rg.SiteError, ["node 'n'", "source site mlp_act[0] pos=last has another shape than the site"]),
    ("resample_one_row", lambda lm, p: one(S("resid_post", 0, positions="last"), rg.Ablate("resample")).run(
        lm, ["hello"]), rg.SiteError, ["node 'n'", "Ablate('resample')", "at least 2 rows", "1 rows"]),
    ("resample_unequal_rows", lambda lm, p: one(S("resid_post", 0, positions="all"), rg.Ablate("resample")).run(
        lm, PROMPTS), rg.SiteError, ["node 'n'", "the same number of selected positions", "[5, 2]"]),
    # -- graph composition -------------------------------------------------------------------
    ("name_with_dot", lambda lm, p: one(S("resid_post", 0), rg.Collect(), name="a.b"), rg.SiteError,
     ["node name 'a.b'", "without '.'"]),
    ("name_empty", lambda lm, p: one(S("resid_post", 0), rg.Collect(), name=""), rg.SiteError,
     ["node name ''", "a non-empty string"]),
    ("name_int", lambda lm, p: one(S("resid_post", 0), rg.Collect(), name=3), rg.SiteError,
     ["node name 3", "a non-empty string"]),
    ("stream_int", lambda lm, p: one(S("resid_post", 0), rg.Collect(), stream=1), rg.SiteError,
     ["node 'n'", "stream must be a non-empty string", "got 1"]),
    ("compose_with_list", lambda lm, p: one(S("resid_post", 0), rg.Collect()) | [], rg.SiteError,
     ["cannot compose a Graph with list"]),
    ("subgraph_unknown", lambda lm, p: one(S("resid_post", 0), rg.Collect()).subgraph(["m"]), KeyError,
     ["no node 'm'", "nodes: ['n']"]),
    ("add_hf_module_as_op", lambda lm, p: rg.Graph().add(S("resid_post", 0), torch.nn.Linear(2, 2), name="x"),
     rg.SiteError, ["node 'x'", "op must be a reftgraph op", "Linear"]),
    ("add_dict_as_site", lambda lm, p: rg.Graph().add({"component": "resid_post"}, rg.Collect(), name="x"),
     rg.SiteError, ["node 'x'", "site must be a reftgraph.Site", "dict"]),
    # -- run inputs ----------------------------------------------------------------------------
    ("prompts_none", lambda lm, p: rg.Graph().run(lm, None), rg.DataError,
     ["prompts must be a non-empty list of strings", "NoneType"]),
    ("prompts_with_int", lambda lm, p: rg.Graph().run(lm, ["a", 3]), rg.DataError,
     ["prompts must be a non-empty list of strings", "holding a int"]),
    ("sources_list", lambda lm, p: one(S("resid_pre", 1, positions="last"), rg.Patch()).run(lm, PROMPTS, sources=["a"]),
     rg.DataError, ["sources must be a dict {stream name: prompts}", "got list"]),
    ("source_prompts_int", lambda lm, p: one(S("resid_pre", 1, positions="last"), rg.Patch()).run(
        lm, PROMPTS, sources={"source": 7}), rg.DataError, ["sources['source'] must be a non-empty list", "int"]),
    ("padding_side", lambda lm, p: rg.Graph().run(lm, PROMPTS, padding_side="middle"), rg.DataError,
     ["padding_side must be 'left' or 'right'", "'middle'"]),
    ("model_unwrapped", lambda lm, p: rg.Graph().run(lm.hf, PROMPTS), rg.SiteError,
     ["expected a reftgraph Model", "rg.wrap(hf_model, tokenizer)", "LlamaForCausalLM"]),
    # -- generate inputs -----------------------------------------------------------------------
    ("generate_zero_tokens", lambda lm, p: rg.Graph().generate(lm, PROMPTS, max_new_tokens=0), ValueError,
     ["max_new_tokens", "greater than 0", "0"]),
    ("generate_template", lambda lm, p: rg.Graph().generate(lm, PROMPTS, template="llama3"), ValueError,
     ["template must be None, 'chat' or a function", "'llama3'"]),
    ("generate_positions_beyond", lambda lm, p: one(S("resid_post", 0, positions=[4]), rg.Collect()).generate(
        lm, PROMPTS, max_new_tokens=2), rg.SiteError, ["node 'n'", "beyond the prompt of row 1", "0..1"]),
    ("generate_with_patch", lambda lm, p: one(S("resid_post", 0, positions="last"), rg.Patch("source")).generate(
        lm, PROMPTS, max_new_tokens=2),
     rg.SiteError, ["node 'n'", "generation runs the base stream only", "patch from sources with run()"]),
    ("generate_prompts_empty", lambda lm, p: rg.Graph().generate(lm, [], max_new_tokens=2), rg.DataError,
     ["prompts must be a non-empty list of strings"]),
    # -- datasets ------------------------------------------------------------------------------
    ("pairs_not_pairs", lambda lm, p: PromptResponse(["abc"]), ValueError,
     ["(prompt, response) pairs", "row 0 is 'abc'"]),
    ("pairs_empty", lambda lm, p: PromptResponse([]), ValueError, ["at least one (prompt, response) pair"]),
    ("pairs_template", lambda lm, p: PromptResponse([("a", "b")], template=1), ValueError,
     ["template must be None, 'chat' or a function", "1"]),
    ("labels_count", lambda lm, p: Classification(["a", "b"], [0]), ValueError, ["as many labels as texts"]),
    ("labels_negative", lambda lm, p: Classification(["a", "b"], [0, -1]), ValueError,
     ["class indices 0, 1, ...", "label 1 is -1"]),
    ("labels_str", lambda lm, p: Classification(["a"], ["yes"]), ValueError, ["class indices", "'yes'"]),
    ("collate_padding_side", lambda lm, p: collate_lm(lm, ["a"], ["b"], padding_side="up"), ValueError,
     ["padding_side must be 'left' or 'right'", "'up'"]),
    # -- training arguments ----------------------------------------------------------------------
    ("train_no_trainable", lambda lm, p: train(lm, reft(lm).freeze()), ValueError, ["no trainable parameters"]),
    ("train_data_list", lambda lm, p: train(lm, data=[("a", "b")]), TypeError,
     ["data must be reftgraph.data.PromptResponse or Classification"]),
    ("train_classify_missing", lambda lm, p: train(lm, data=Classification(["a", "b"], [0, 1])), ValueError,
     ["exactly one Classify node"]),
    ("train_resume_not_checkpoint", lambda lm, p: train(lm, resume=p / "nowhere"), ValueError,
     ["is not a checkpoint folder", "checkpoints beside it"]),
    ("train_lr_negative", lambda lm, p: train(lm, lr=-1.0), ValueError, ["lr must be > 0", "-1"]),
    ("train_padding_side", lambda lm, p: train(lm, padding_side="top"), ValueError,
     ["padding_side must be 'left' or 'right'", "'top'"]),
    ("train_cache_prefix_shuffled", lambda lm, p: train(lm, cache_prefix=True, batch_size=1), ValueError,
     ["cache_prefix=True needs batches that repeat", "shuffle=False"]),
    ("train_graph_layer", lambda lm, p: train(lm, rg.reft_graph(rg.models.tiny("llama", num_hidden_layers=3),
                                                                 layers=[2], rank=2)),
     rg.SiteError, ["node 'L2_first'", "layer 2 out of range", "valid layers 0..1"]),
    ("train_model_hf", lambda lm, p: rg.train(reft(lm), lm.hf, DATA, progress=False), rg.SiteError,
     ["expected a reftgraph Model"]),
    # -- save / load -------------------------------------------------------------------------------
    ("save_over_file", lambda lm, p: (p.joinpath("notes.txt").write_text("mine"),
                                      rg.save(reft(lm), p / "notes.txt")),
     rg.GraphFileError, ["notes.txt exists and is not a saved graph", "not replacing it"]),
    ("save_over_folder", lambda lm, p: ((p / "project").mkdir(), (p / "project" / "a.py").write_text("x"),
                                        rg.save(reft(lm), p / "project")),
     rg.GraphFileError, ["project exists and is not a saved graph (no graph.json)"]),
    ("load_missing", lambda lm, p: rg.load_graph(p / "nowhere"), rg.GraphFileError,
     ["is not a saved graph: graph.json is missing"]),
    ("load_for_wider_model", lambda lm, p: rg.load_graph(
        rg.save(reft(rg.models.tiny("llama", hidden_size=64, intermediate_size=96)), p / "g",
                model=rg.models.tiny("llama", hidden_size=64, intermediate_size=96)), model=lm),
     rg.GraphFileError, ["saved for 'tiny-llama' (d_model 64)", "(d_model 32)"]),
    ("load_for_other_family", lambda lm, p: rg.load_graph(rg.save(reft(lm), p / "g", model=lm),
                                                          model=rg.models.tiny("gpt2")),
     rg.GraphFileError, ["saved for 'tiny-llama' (family llama)", "not 'tiny-gpt2' (family gpt2)"]),
]


@pytest.mark.parametrize("call, error, parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(lm, forwards, tmp_path, call, error, parts):
    with pytest.raises(error) as err:
        call(lm, tmp_path)
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in the message:\n{message}"
    assert not forwards, "a forward pass ran before the error"


def test_the_forward_counter_sees_runs_generation_and_training(lm, forwards):
    """The guard above does see each kind of call that runs the model."""
    rg.Graph().run(lm, PROMPTS)
    n = len(forwards)
    assert n >= 1
    rg.Graph().generate(lm, PROMPTS, max_new_tokens=2)
    assert len(forwards) > n
    n = len(forwards)
    train(lm, epochs=1)
    assert len(forwards) > n


def test_save_refusals_leave_the_files(lm, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "a.py").write_text("x")
    for target in ("notes.txt", "project"):
        with pytest.raises(rg.GraphFileError):
            rg.save(reft(lm), tmp_path / target)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "project" / "a.py").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "project"]
    (tmp_path / "empty").mkdir()
    rg.save(reft(lm), tmp_path / "empty")  # an empty folder is fine
    assert len(rg.load_graph(tmp_path / "empty")) == 1


# -- CLI specs: one line, before the model loads --------------------------------------------------

SPEC_CASES = [
    ("not_a_mapping", "[1, 2]", "the spec must be a mapping"),
    ("graph_not_mapping", "graph: 3\ndata: {path: t.jsonl}", "'graph' must be a mapping of"),
    ("no_data_path", "graph: {}\ndata: {template: chat}", "'data' needs a 'path'"),
    ("no_graph", "data: {path: t.jsonl}", "the spec has no 'graph' section"),
    ("epochs_text", "graph: {}\ndata: {path: t.jsonl}\ntrain: {epochs: ten}", "train.epochs must be an int >= 1"),
    ("batch_zero", "graph: {}\ndata: {path: t.jsonl}\ntrain: {batch_size: 0}", "train.batch_size must be an int >= 1"),
    ("lr_zero", "graph: {}\ndata: {path: t.jsonl}\ntrain: {lr: 0}", "train.lr must be a number > 0, got 0"),
    ("padding", "graph: {}\ndata: {path: t.jsonl}\ntrain: {padding_side: middle}",
     "train.padding_side must be one of 'left', 'right'"),
    ("rank", "graph: {rank: -2}\ndata: {path: t.jsonl}", "graph.rank must be an int >= 1, got -2"),
    ("positions", "graph: {positions: f3+x}\ndata: {path: t.jsonl}", "graph.positions unknown position selector"),
    ("op", "graph: {op: GReFT}\ndata: {path: t.jsonl}", "graph.op must be one of 'LoReFT'"),
    ("dropout", "graph: {dropout: 1}\ndata: {path: t.jsonl}", "graph.dropout must be a number >= 0 and < 1"),
    ("component", "graph: {component: resid}\ndata: {path: t.jsonl}", "graph.component must be one of 'resid_pre'"),
    ("model_number", "model: 7\ngraph: {}\ndata: {path: t.jsonl}", "'model' must be a string"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(tmp_path, text, message):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "response": "b"}')
    (tmp_path / "spec.yaml").write_text(text)
    with pytest.raises(SpecError) as err:
        read_spec(tmp_path / "spec.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rows, message", [
    (['[1, 2]'], "t.jsonl:1: each line must be a JSON object"),
    (['{"text": "a", "label": "yes"}'], "t.jsonl:1: a classification row needs an integer 'label'"),
    (['{"prompt": "a", "response": "b"}', '{"text": "c", "label": 0}'], "mixes prompt/response rows"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "b"'], "t.jsonl:2: not valid JSON"),
    (['{"question": "a"}'], "t.jsonl:1: a row needs 'prompt' and 'response'"),
], ids=["list_row", "label_text", "mixed", "bad_json", "other_keys"])
def test_bad_data_rows(tmp_path, rows, message):
    (tmp_path / "t.jsonl").write_text("\n".join(rows))
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_rows(tmp_path / "t.jsonl")


def test_bad_spec_through_the_cli_is_one_line_and_no_model_loads(tmp_path, capsys, monkeypatch):
    import reftgraph.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(reftgraph.models, "load", no_load)
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}))
    (tmp_path / "spec.yaml").write_text("graph: {layers: [0]}\ndata: {path: t.jsonl}\ntrain: {grad_accum: 0}")
    from reftgraph.cli import main

    assert main(["train", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "reftgraph train: error: train.grad_accum must be an int >= 1, got 0"


@pytest.mark.parametrize("argv, message", [
    (["generate", "{none}", "--prompt", "hi"], "none does not exist"),
    (["generate", "{fake}", "--prompt", "hi"], "graph.json is not valid JSON"),
    (["generate", "{none}", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be > 0, got 0"),
    (["generate", "{none}"], "give --prompt TEXT (repeatable) or --prompts FILE"),
    (["show", "{fake}"], "graph.json is not valid JSON"),
    (["demo", "--rank", "-1"], "argument --rank: must be > 0, got -1"),
    (["demo", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["demo", "--kl-weight", "-1"], "argument --kl-weight: must be a finite number >= 0, got -1"),
    (["demo", "--kl-weight", "inf"], "argument --kl-weight: must be a finite number >= 0, got inf"),
    (["demo", "--style", "bold"], "argument --style: invalid choice: 'bold'"),
], ids=["generate_no_graph", "generate_bad_json", "generate_zero_tokens", "generate_no_prompt", "show_bad_json",
        "demo_rank", "demo_lr", "demo_kl_weight", "demo_kl_inf", "demo_style"])
def test_bad_cli_arguments_exit_2_without_loading_a_model(tmp_path, capsys, monkeypatch, argv, message):
    import reftgraph.models
    from reftgraph.cli import main

    monkeypatch.setattr(reftgraph.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "graph.json").write_text("{not json")
    (tmp_path / "fake" / "weights.safetensors").write_bytes(b"")
    argv = [str(tmp_path / a[1:-1]) if a.startswith("{") else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


# -- Reliability (issue 29): silently wrong results, stale plans, limits, threads --------------------

def _own_rows(lm, prompts):
    """The model's own forward on each prompt alone (no padding): [n, S_i, vocab] per row."""
    return [lm.hf(**lm.tokenizer(p, return_tensors="pt")).logits[0] for p in prompts]


@pytest.mark.parametrize("model_type", ["roberta", "roberta-prelayernorm", "camembert", "data2vec-text",
                                        "llama", "gpt2"])
def test_an_empty_graph_runs_the_model_as_the_model_runs_itself(model_type):
    lm = rg.models.tiny(model_type)
    prompts = ["hello world", "hi", "abc"]
    own = _own_rows(lm, prompts)
    for side in ("left", "right"):
        out = rg.Graph().run(lm, prompts, padding_side=side)
        for row, ref in enumerate(own):
            real = out.attention_mask[row].bool()
            torch.testing.assert_close(out.logits[row][real], ref, atol=1e-5, rtol=1e-5)
    # generation (left-padded batch) gives each prompt what the model's own generate gives it alone
    got = rg.Graph().generate(lm, prompts, max_new_tokens=4)
    for row, p in enumerate(prompts):
        enc = lm.tokenizer(p, return_tensors="pt")
        ref = lm.hf.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert got.new_ids[row].tolist() == ref[0, enc["input_ids"].shape[1]:].tolist()


def test_models_that_number_positions_themselves_are_proven_so():
    assert rg.models.tiny("roberta").arch.positions == "model"      # positions from padding_idx + 1
    assert rg.models.tiny("llama").arch.positions == "explicit"
    assert rg.models.tiny("roberta").arch.padding == {}              # both padding sides proven


def _patch_graph():
    g = rg.Graph()
    g.add(S("resid_pre", 1, positions="last"), rg.Patch("s1"), name="p")
    g.add(S("resid_pre", 1, positions="last"), rg.Collect(), name="c")
    return g


def test_setting_patch_source_after_a_run_reads_the_new_stream(lm):
    def graph(source):
        g = _patch_graph()
        g["p"].op.source = source
        g.add(S("resid_pre", 0, positions=[0]), rg.Patch("s1"), name="q")   # both streams stay read
        g.add(S("resid_pre", 0, positions=[1]), rg.Patch("s2"), name="r")
        return g

    sources = {"s1": ["xyz"], "s2": ["qqq"]}
    g = graph("s1")
    before = g.run(lm, ["abc"], sources=sources)["c"]
    g["p"].op.source = "s2"
    after = g.run(lm, ["abc"], sources=sources)["c"]
    assert not torch.equal(before, after)
    assert torch.equal(after, graph("s2").run(lm, ["abc"], sources=sources)["c"])
    g["p"].op.source = "s3"
    with pytest.raises(rg.SiteError, match="node 'p'.*stream 's3' was not given"):
        g.run(lm, ["abc"], sources=sources)


def test_setting_patch_site_after_a_run_reads_the_new_site(lm):
    g = _patch_graph()
    before = g.run(lm, ["abc"], sources={"s1": ["xyz"]})["c"]
    g["p"].op.site = S("resid_pre", 0, positions="last")
    after = g.run(lm, ["abc"], sources={"s1": ["xyz"]})["c"]
    ref = rg.Graph()
    ref.add(S("resid_pre", 0, positions="last"), rg.Collect(), name="src")
    assert not torch.equal(before, after)
    assert torch.equal(after, ref.run(lm, ["xyz"])["src"])


def test_a_changed_op_is_checked_again_before_the_next_run(lm):
    g = one(S("resid_pre", 1), rg.Add(torch.ones(32)), name="a")
    g.run(lm, ["ab"])
    g["a"].op.vector = torch.ones(16)
    with pytest.raises(rg.SiteError, match="node 'a' at resid_pre.*Add has width 16, the site needs 32"):
        g.run(lm, ["ab"])
    g = one(S("resid_pre", 1), rg.Ablate(), name="a")
    g.run(lm, ["ab"])
    g["a"].op.mode = "resample"
    with pytest.raises(rg.SiteError, match="node 'a'.*Ablate\\('resample'\\) .* at least 2 rows"):
        g.run(lm, ["ab"])
    g["a"].op.mode = "sideways"
    with pytest.raises(rg.SiteError, match="node 'a'.*mode must be one of"):
        g.run(lm, ["ab", "cd"])


def test_an_edit_at_resid_mid_does_not_show_in_attn_out(lm):
    plain = one(S("attn_out", 0), rg.Collect(), name="a")
    g = rg.Graph()
    g.add(S("resid_mid", 0), rg.Add(torch.ones(32)), name="push")
    g.add(S("attn_out", 0), rg.Collect(), name="a")
    g.add(S("resid_mid", 0), rg.Collect(), name="m")
    out = g.run(lm, ["abc"])
    assert torch.equal(out["a"], plain.run(lm, ["abc"])["a"])
    mid = one(S("resid_mid", 0), rg.Collect(), name="m").run(lm, ["abc"])["m"]
    torch.testing.assert_close(out["m"], mid + 1)
    # an edit at attn_out does show in resid_mid (it is written through it)
    g = rg.Graph()
    g.add(S("resid_mid", 0), rg.Collect(), name="m")
    g.add(S("attn_out", 0), rg.Add(torch.ones(32)), name="push")
    torch.testing.assert_close(g.run(lm, ["abc"])["m"], mid + 1)


def test_editing_a_result_in_place_does_not_change_later_runs(lm):
    first = rg.Graph().run(lm, PROMPTS)
    ids = first.input_ids.clone()
    first.input_ids[:] = 7
    first.attention_mask[:] = 0
    again = rg.Graph().run(lm, PROMPTS)
    assert torch.equal(again.input_ids, ids) and bool(again.attention_mask.any())


def test_tokens_added_to_the_tokenizer_reach_later_runs():
    lm = rg.models.tiny("llama")
    before = rg.Graph().run(lm, ["a <mark> b"]).input_ids
    lm.tokenizer.add_tokens(["<mark>"])
    lm.hf.resize_token_embeddings(len(lm.tokenizer))
    after = rg.Graph().run(lm, ["a <mark> b"]).input_ids
    assert after.shape[1] < before.shape[1]
    assert after.tolist() == [lm.tokenizer("a <mark> b")["input_ids"]]


def _handles(tmp_path):
    import socket
    import threading

    path = tmp_path / "secret.txt"
    path.write_text("a secret")
    return {"file_read": lambda: open(path), "file_write": lambda: open(tmp_path / "out.bin", "wb"),
            "lock": threading.Lock, "rlock": threading.RLock, "generator": lambda: (i for i in range(3)),
            "socket": socket.socket}


@pytest.mark.parametrize("kind", ["file_read", "file_write", "lock", "rlock", "generator", "socket"])
def test_an_op_holding_a_live_handle_is_refused_before_a_remote_call(lm, tmp_path, kind, monkeypatch):
    import nnsight.intervention.serialization as serialization

    handle = _handles(tmp_path)[kind]()
    op = rg.Add(torch.ones(32))
    op.extra = {"kept": [handle]}
    sent = []
    monkeypatch.setattr(serialization, "dumps", lambda *a, **k: sent.append(a) or b"")
    with pytest.raises(rg.SiteError, match=r"node 'n' at resid_pre\[0\].*holds a live handle, .extra"):
        one(S("resid_pre", 0), op).run(lm, ["ab"], remote="local")
    assert sent == []
    if hasattr(handle, "close"):
        handle.close()


def test_a_file_an_op_reads_through_its_code_is_refused(lm, tmp_path):
    f = open(_write(tmp_path / "secret.txt", "a secret"))

    class Reader(rg.Add):
        def forward(self, h, source=None, valid=None):
            f.read()
            return h

    with pytest.raises(rg.SiteError, match="node 'n'.*live handle.*an open file"):
        one(S("resid_pre", 0), Reader(torch.ones(32))).run(lm, ["ab"], remote="local")
    f.close()


def _write(path, text):
    path.write_text(text)
    return path


def test_first_last_selectors_allocate_in_proportion_to_the_prompt(lm):
    g = one(S("resid_pre", 0, positions="f30000000+l1"), rg.Collect(), name="c")
    out = g.run(lm, ["abc", "a"])
    assert out["c"].shape == (2, 4, 32)       # first 3 and last 1 slot of a batch 3 tokens wide
    assert out.valid["c"].sum(1).tolist() == [3, 1]


def test_building_a_large_graph_computes_no_edges(lm, monkeypatch):
    calls = []
    real = rg.Graph._feeds
    monkeypatch.setattr(rg.Graph, "_feeds", staticmethod(lambda *a, **k: calls.append(1) or real(*a, **k)))
    g = rg.Graph()
    for i in range(2000):
        g.add(S("resid_pre", 0, positions="last"), rg.Collect(), name=f"c{i}")
    h = rg.Graph()
    for i in range(2000):
        h.add(S("resid_pre", 1, positions="last"), rg.Add(torch.zeros(32)), name=f"a{i}")
    both = g | h
    out = both.run(lm, ["ab"])
    assert calls == [] and len(out.collected) == 2000
    chain = rg.Graph()
    for i in range(4):
        chain.add(S("resid_pre", 0), rg.Add(torch.zeros(32)), name=f"a{i}")
    assert set(chain.edges) == {(f"a{i}", f"a{j}") for i in range(4) for j in range(i + 1, 4)}


def test_two_threads_on_one_model_get_what_each_gets_alone(lm):
    import threading

    g = one(S("resid_post", 0, positions="last"), rg.Add(torch.ones(32)))
    jobs = [lambda: g.run(lm, ["hello there", "x"], padding_side="right").logits,
            lambda: g.run(lm, ["hello there", "x"], padding_side="left").logits,
            lambda: g.generate(lm, ["ab", "abcd"], max_new_tokens=3).ids]
    alone = [job() for job in jobs]
    failures = []

    def work(k):
        for i in range(12):
            j = (i + k) % len(jobs)
            try:
                if not torch.equal(jobs[j](), alone[j]):
                    failures.append(f"job {j}: another result")
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"job {j}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_prompts_longer_than_learned_positions_are_refused_before_any_forward():
    lm = rg.models.tiny("gpt2")     # 128 learned positions
    with pytest.raises(rg.DataError, match="prompt 1 is 200 tokens; .* learned position embeddings for 128"):
        rg.Graph().run(lm, ["ab", "a" * 200])
    with pytest.raises(rg.DataError, match="100 prompt tokens \\+ max_new_tokens=40 pass the 128 positions"):
        rg.Graph().generate(lm, ["a" * 100], max_new_tokens=40)


def test_a_prompt_with_a_lone_surrogate_is_refused(lm):
    with pytest.raises(rg.DataError, match=r"prompts\[1\] is not valid text: .* lone surrogate"):
        rg.Graph().run(lm, ["ab", "a\ud800b"])


def test_a_model_that_is_neither_a_causal_lm_nor_an_encoder_is_refused_saying_what_it_is():
    from transformers import LlamaConfig, LlamaModel, T5Config, T5Model

    tok = rg.models.tiny("llama").tokenizer
    llama = LlamaModel(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=100))
    with pytest.raises(rg.SiteError, match="LlamaModel is a model that cannot generate.*AutoModelForCausalLM"):
        rg.wrap(llama, tok)
    t5 = T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=100))
    with pytest.raises(rg.SiteError, match="T5Model is an encoder-decoder without a language-model head.*"
                                           "AutoModelForSeq2SeqLM"):
        rg.wrap(t5, tok)


def test_image_positions_on_a_text_only_model_are_refused_before_the_forward():
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=0, positions="image"), rg.Collect(), name="img")
    with pytest.raises(rg.SiteError, match="node 'img' .*positions='image' selects a vision-language model's image"):
        g.run(rg.models.tiny("llama"), ["no image here"])
