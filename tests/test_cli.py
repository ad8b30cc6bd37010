"""The command line on a tiny model saved to a local folder."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import reftgraph as rg
from reftgraph.cli import main


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = rg.models.tiny("llama")
    lm.hf.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture()
def spec(tmp_path, tiny_path):
    rows = [{"prompt": p, "response": r} for p, r in [("ab", "cd"), ("abc", "de"), ("b", "xy"), ("ca", "a")]]
    write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    return write(tmp_path / "spec.yaml", f"""
model: {tiny_path}
graph: {{layers: [0, 1], positions: f1+l1, rank: 2}}
data: {{path: train.jsonl}}
train: {{epochs: 2, batch_size: 2, lr: 0.01}}
output: {tmp_path / 'out'}
""")


def test_train_generate_show(spec, tmp_path, capsys):
    assert main(["train", str(spec)]) == 0
    out = tmp_path / "out"
    for name in ("history.csv", "curve.png", "graph.png", "checkpoints/epoch-1/state.json"):
        assert (out / name).is_file(), name
    assert len(rg.load_graph(out / "graph")) == 4
    assert "trainable intervention params: 520" in capsys.readouterr().out  # 4 ops x (2*2*32 + 2)

    assert main(["generate", str(out / "graph"), "--prompt", "ab", "--prompt", "b", "--no-template",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("without graph:") == 2 and printed.count("with graph:") == 2

    assert main(["show", str(out / "graph"), "--png", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "L0_first" in printed and "LoReFT" in printed and "520 trainable parameters" in printed
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_resume_continues_from_the_checkpoint(spec, tmp_path, capsys):
    assert main(["train", str(spec)]) == 0
    first = (tmp_path / "out" / "history.csv").read_text()
    assert main(["train", str(spec), "--resume"]) == 0  # both epochs done: nothing left to train
    assert (tmp_path / "out" / "history.csv").read_text() == first


def test_eval_path_is_scored_after_every_epoch(spec, tmp_path, capsys):
    import pandas as pd

    write(tmp_path / "held_out.jsonl", json.dumps({"prompt": "bc", "response": "da"}))
    write(spec, spec.read_text().replace("data: {path: train.jsonl}", "data: {path: train.jsonl, eval_path: held_out.jsonl}"))
    assert main(["train", str(spec)]) == 0
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    scored = history["eval_loss"].dropna()
    assert len(scored) == 2 and (scored > 0).all()  # one score per epoch, on the last step's row
    g = rg.load_graph(tmp_path / "out" / "graph")
    lm = rg.load(str(spec.read_text().split("model: ")[1].split()[0]))
    held_out = rg.data.PromptResponse([("bc", "da")])
    assert abs(rg.training.evaluate(g, lm, held_out, batch_size=2) - scored.iloc[-1]) < 1e-5


def test_kl_term_from_the_spec(spec, tmp_path):
    """train.kl_weight / kl_groups and data.kl_path reach rg.train: the history has the KL
    columns and equals the same training called from Python."""
    import pandas as pd

    write(tmp_path / "facts.jsonl", "\n".join(json.dumps({"prompt": p, "response": r})
                                              for p, r in [("Sky?", "Blue."), ("Snow?", "White.")]))
    text = spec.read_text().replace("data: {path: train.jsonl}", "data: {path: train.jsonl, kl_path: facts.jsonl}")
    write(spec, text.replace("lr: 0.01}", "lr: 0.01, kl_weight: 2e-1, kl_groups: case}"))
    assert main(["train", str(spec)]) == 0
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history.columns) == ["epoch", "step", "loss", "lr", "ce", "kl"]
    lm = rg.load(str(spec.read_text().split("model: ")[1].split()[0]))
    g = rg.reft_graph(lm, layers=[0, 1], positions="f1+l1", rank=2)
    pairs = [("ab", "cd"), ("abc", "de"), ("b", "xy"), ("ca", "a")]
    direct = rg.train(g, lm, rg.data.PromptResponse(pairs), epochs=2, batch_size=2, lr=0.01, kl_weight=0.2,
                      kl_data=[("Sky?", "Blue."), ("Snow?", "White.")], kl_groups="case", progress=False)
    assert history["loss"].tolist() == pytest.approx(direct["loss"].tolist(), abs=1e-6)
    assert history["kl"].tolist() == pytest.approx(direct["kl"].tolist(), abs=1e-6)


@pytest.mark.parametrize("edit, message", [
    (("lr: 0.01}", "lr: 0.01, kl_weight: -1}"), "train.kl_weight must be a number >= 0, got -1"),
    (("lr: 0.01}", "lr: 0.01, kl_groups: lower}"), "train.kl_groups must be null or 'case', got 'lower'"),
    (("{path: train.jsonl}", "{path: train.jsonl, kl_path: none.jsonl}"), "none.jsonl"),
])
def test_bad_kl_settings_in_a_spec_exit_2(spec, capsys, edit, message):
    write(spec, spec.read_text().replace(*edit))
    assert main(["train", str(spec)]) == 2
    assert message in capsys.readouterr().err


def test_kl_rows_must_be_prompt_response_rows(spec, tmp_path, capsys):
    write(tmp_path / "labels.jsonl", json.dumps({"text": "ab", "label": 0}))
    write(spec, spec.read_text().replace("{path: train.jsonl}", "{path: train.jsonl, kl_path: labels.jsonl}"))
    assert main(["train", str(spec)]) == 2
    assert "the KL rows must be {prompt, response} rows" in capsys.readouterr().err


def test_caps_experiment_is_the_first_demo(monkeypatch):
    """reftgraph.cli.caps_experiment (public since the first demo) runs the library's style
    experiment in CAPITALS without the KL term."""
    import reftgraph.experiments
    from reftgraph.cli import caps_experiment

    seen = {}
    monkeypatch.setattr(reftgraph.experiments, "style_experiment", lambda *a, **k: seen.update(args=a, kw=k))
    caps_experiment("lm", layers=[3], epochs=2, progress=False)
    assert seen["args"] == ("lm", [3], 4, 2, 6e-3, 90, 24, False)
    assert seen["kw"] == {"style": "caps", "kl_weight": 0}


def test_configs_are_the_arguments_of_the_functions_beside_them():
    import inspect

    from reftgraph.cli.spec import GraphSpec, TrainSpec
    from reftgraph.methods.reft import ReftGraphConfig
    from dataclasses import fields

    assert GraphSpec is ReftGraphConfig and TrainSpec is rg.training.TrainConfig   # the older names
    for section, fn in ((ReftGraphConfig, rg.reft_graph), (rg.training.TrainConfig, rg.train),
                        (rg.patching.SweepConfig, rg.patching.sweep), (rg.circuits.CircuitConfig, rg.circuits.discover)):
        package = (lambda obj: obj.__module__.rsplit(".", 1)[0])
        assert package(section) == package(fn), f"{section.__name__} lives beside {fn.__name__}"
        params = inspect.signature(fn).parameters
        for f in fields(section):
            assert f.name in params, f"{section.__name__}.{f.name} is not an argument of {fn.__name__}"
            assert f.default == params[f.name].default, f"{section.__name__}.{f.name}: default differs"
            assert f.metadata["help"], f"{section.__name__}.{f.name} has no help text"
            assert section.problem(f.name, f.default) is None, f"{section.__name__}.{f.name}: default fails its check"


def test_help_on_every_subcommand():
    for cmd in ([], ["demo"], ["train"], ["generate"], ["show"]):
        r = subprocess.run([sys.executable, "-m", "reftgraph", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: reftgraph" in r.stdout


@pytest.mark.parametrize("case, message", [
    ("missing_spec", "spec file not found"),
    ("missing_data", "data file not found"),
    ("unknown_key", "unknown key 'epoch' in 'train'; did you mean 'epochs'?"),
    ("unknown_section", "unknown key 'grph' in the spec; did you mean 'graph'?"),
    ("bad_layer", "graph.layers: layer 7 out of range"),
    ("empty_data", "the dataset is empty"),
    ("no_response", "train.jsonl:2: the row has a prompt but no response"),
    ("bad_yaml", "not valid YAML"),
])
def test_bad_specs_give_one_line_and_exit_2(case, message, tmp_path, tiny_path, capsys):
    rows = '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": ""}' if case == "no_response" else (
        "" if case == "empty_data" else '{"prompt": "a", "response": "b"}')
    if case != "missing_data":
        write(tmp_path / "train.jsonl", rows)
    train = "{epoch: 2}" if case == "unknown_key" else "{epochs: 1}"
    graph_key = "grph" if case == "unknown_section" else "graph"
    layers = "[0, 7]" if case == "bad_layer" else "[0]"
    text = f"model: {tiny_path}\n{graph_key}: {{layers: {layers}}}\ndata: {{path: train.jsonl}}\ntrain: {train}\n"
    if case == "bad_yaml":
        text = "model: [unclosed\n"
    path = tmp_path / "spec.yaml"
    if case != "missing_spec":
        write(path, text)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(spec, tmp_path, capsys, monkeypatch):
    import reftgraph.training.supervised as training

    real, calls = training._batch_loss, []

    def interrupt_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 0 has two batches; stop in the middle of epoch 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_batch_loss", interrupt_in_second_epoch)
    assert main(["train", str(spec)]) == 130
    err = capsys.readouterr().err
    assert "epoch-0" in err and f"reftgraph train {spec} --resume" in err
    assert not (tmp_path / "out" / "checkpoints" / "epoch-1").exists()
    monkeypatch.setattr(training, "_batch_loss", real)
    assert main(["train", str(spec), "--resume"]) == 0
    assert (tmp_path / "out" / "checkpoints" / "epoch-1" / "state.json").is_file()


def one_line_error(capsys) -> str:
    """What the command printed on stderr, besides progress bars: one line."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- resume checks the graph and the settings ---------------------------------------------------

@pytest.mark.parametrize("graph, message", [
    ("{layers: [1], positions: f1+l1, rank: 2}", "node 'L0_first' (LoReFT at resid_post[0] pos=f1+l0) is in the "
                                                 "checkpoint, not in this graph"),
    ("{layers: [0, 1], positions: f1+l1, rank: 2, component: resid_pre}",
     "node 'L0_first': site resid_post[0] pos=f1+l0, now resid_pre[0] pos=f1+l0"),
    ("{layers: [0, 1], positions: f1+l1, rank: 2, op: DiReFT}", "node 'L0_first': op LoReFT, now DiReFT"),
    ("{layers: [0, 1], positions: f1+l1, rank: 4}", "node 'L0_first': LoReFT rank=2, now 4"),
], ids=["layer", "component", "op", "rank"])
def test_resume_with_another_graph_exits_2(spec, tmp_path, capsys, graph, message):
    assert main(["train", str(spec)]) == 0
    capsys.readouterr()
    write(spec, spec.read_text().replace("{layers: [0, 1], positions: f1+l1, rank: 2}", graph))
    assert main(["train", str(spec), "--resume"]) == 2
    err = one_line_error(capsys)
    assert "it was trained with another graph" in err and message in err


def test_resume_with_other_settings_exits_2(spec, capsys):
    assert main(["train", str(spec)]) == 0
    capsys.readouterr()
    write(spec, spec.read_text().replace("batch_size: 2", "batch_size: 4"))
    assert main(["train", str(spec), "--resume"]) == 2
    assert "other settings (batch_size=2, now 4)" in one_line_error(capsys)


# -- training that turns non-finite -------------------------------------------------------------

@pytest.mark.parametrize("train, message", [
    ("{epochs: 1, lr: 3.0e+37, weight_decay: 100}", "became NaN or infinite in the optimizer step"),
    ("{epochs: 1, lr: 1.0e+38}", "the optimizer step overflowed"),
], ids=["weights_infinite", "adamw_overflow"])
def test_non_finite_training_exits_1_and_writes_nothing(spec, tmp_path, capsys, train, message):
    write(spec, spec.read_text().replace("{epochs: 2, batch_size: 2, lr: 0.01}", train))
    assert main(["train", str(spec)]) == 1
    err = one_line_error(capsys)
    assert err.startswith("reftgraph train: training stopped: ") and message in err
    assert not (tmp_path / "out" / "graph").exists()
    assert not list((tmp_path / "out" / "checkpoints").iterdir())


# -- everything that can be checked before training is, and is one line, exit 2 ------------------

def no_model_load(monkeypatch):
    import reftgraph.models

    monkeypatch.setattr(reftgraph.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("row, message", [
    ({"prompt": None, "response": "x"}, "train.jsonl:2: 'prompt' must be a string, got null"),
    ({"prompt": ["a", "b"], "response": "x"}, "train.jsonl:2: 'prompt' must be a string, got [\"a\", \"b\"]"),
    ({"prompt": "a", "response": 0}, "train.jsonl:2: 'response' must be a string, got 0"),
    ({"text": None, "label": 0}, "train.jsonl:2: 'text' must be a string, got null"),
    ({"text": "a", "label": True}, "train.jsonl:2: a classification row needs an integer 'label'"),
    ({"text": "a", "label": -1}, "class index in 0..9999 (at most 10,000 classes); got -1"),
    ({"text": "a", "label": 10**9}, "class index in 0..9999 (at most 10,000 classes); got 1000000000"),
], ids=["prompt_null", "prompt_list", "response_int", "text_null", "label_true", "label_negative", "label_huge"])
def test_rows_that_are_not_text_exit_2(spec, tmp_path, capsys, monkeypatch, row, message):
    first = {"text": "ab", "label": 0} if "text" in row else {"prompt": "ab", "response": "cd"}
    write(tmp_path / "train.jsonl", json.dumps(first) + "\n" + json.dumps(row) + "\n")
    no_model_load(monkeypatch)
    assert main(["train", str(spec)]) == 2
    assert message in one_line_error(capsys)


def test_a_data_file_that_is_not_utf8_exits_2(spec, tmp_path, capsys, monkeypatch):
    latin1 = '{"prompt": "ab", "response": "cd"}\n{"prompt": "été", "response": "x"}'.encode("latin-1")
    (tmp_path / "train.jsonl").write_bytes(latin1)
    no_model_load(monkeypatch)
    assert main(["train", str(spec)]) == 2
    assert "train.jsonl:2: not UTF-8 text (byte 0xe9 at offset 47)" in one_line_error(capsys)


def test_a_spec_that_is_not_utf8_exits_2(spec, capsys, monkeypatch):
    spec.write_bytes(spec.read_text().replace("graph:", "# réglages\ngraph:").encode("latin-1"))
    no_model_load(monkeypatch)
    assert main(["train", str(spec)]) == 2
    assert "spec.yaml:3: not UTF-8 text (byte 0xe9" in one_line_error(capsys)


def test_unicode_line_separators_inside_strings_are_text():
    from reftgraph.cli.spec import read_rows

    rows = [{"prompt": "one\u2028two\u2029three\x85four", "response": "x"}, {"prompt": "b", "response": "y"}]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n{bad\n", encoding="utf-8",
                        newline="")
        with pytest.raises(rg.DataError, match="t.jsonl:3: not valid JSON"):
            read_rows(path)
        path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8", newline="")
        assert read_rows(path) == rows


@pytest.mark.parametrize("case, message", [
    ("model_missing", "model '/no/such/model' does not exist"),
    ("output_under_a_file", "cannot be created or written"),
    ("graph_is_a_file", "exists and is not a saved graph"),
    ("lr_inf", "train.lr must be a finite number, got inf"),
    ("chat_template", "has none; pass template=None"),
], ids=["model_missing", "output_under_a_file", "graph_is_a_file", "lr_inf", "chat_template"])
def test_problems_found_before_training_exit_2(spec, tmp_path, capsys, monkeypatch, case, message):
    import reftgraph.training.supervised as training

    text = spec.read_text()
    if case == "model_missing":
        text = text.replace(text.split("model: ")[1].split()[0], "/no/such/model")
    elif case == "output_under_a_file":
        write(tmp_path / "plain-file", "x")
        text = text.replace(f"output: {tmp_path / 'out'}", f"output: {tmp_path / 'plain-file' / 'out'}")
    elif case == "graph_is_a_file":
        (tmp_path / "out").mkdir()
        write(tmp_path / "out" / "graph", "notes")
    elif case == "lr_inf":
        text = text.replace("lr: 0.01", "lr: .inf")
    else:
        text = text.replace("data: {path: train.jsonl}", "data: {path: train.jsonl, template: chat}")
    write(spec, text)
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", str(spec)]) == 2
    assert message in one_line_error(capsys)


def test_generate_with_the_chat_template_on_a_model_without_one_exits_2(spec, tmp_path, tiny_path, capsys,
                                                                        monkeypatch):
    assert main(["train", str(spec)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(rg.Graph, "generate", lambda *a, **k: pytest.fail("generation started"))
    assert main(["generate", str(tmp_path / "out" / "graph"), "--prompt", "ab"]) == 2
    err = one_line_error(capsys)
    assert f"the tokenizer of '{tiny_path}' has none" in err and "--no-template" in err


def test_show_escapes_control_characters_in_names(tmp_path, capsys):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="\x1b[2J\x1b[31mred\u202e")
    folder = g.save(tmp_path / "g")
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x1b[31mred\\u202e" in out


def test_generate_with_a_model_path_that_does_not_exist_exits_2(tmp_path, capsys):
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="c")
    folder = g.save(tmp_path / "g")
    assert main(["generate", str(folder), "--prompt", "ab", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model' does not exist" in one_line_error(capsys)


# -- train and generate connect: the output folder is accepted, and errors say what is there -----

def test_generate_and_show_accept_the_train_output_folder(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules["reftgraph.cli.main"], "command", lambda: ".venv/bin/reftgraph")
    assert main(["train", str(spec)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    assert f"saved the trained graph in {out / 'graph'}/" in printed
    assert f"try it: .venv/bin/reftgraph generate {out} --prompt" in printed
    assert main(["generate", str(out), "--prompt", "ab", "--no-template", "--max-new-tokens", "2"]) == 0
    assert "with graph:" in capsys.readouterr().out
    assert main(["show", str(out), "--png", str(tmp_path / "g.png")]) == 0
    assert "L0_first" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", "{p} does not exist"),
    ("misspelled", "{p} does not exist; did you mean {t}/pirate-graph?"),
    ("file", "{p} is a file, not a saved graph folder"),
    ("empty", "{p} is not a saved graph: it is an empty folder; a saved graph folder holds CURRENT and versions/"),
    ("other", "{p} is not a saved graph: it is a folder containing notes.txt, runs/; a saved graph folder holds"),
    ("empty_graph", "{p}/graph is not a saved graph: graph.json is missing"),
    ("damaged", "{p}/CURRENT holds 'x', not the name of a saved version"),
], ids=lambda v: v if " " not in v else "")
def test_a_folder_that_is_not_a_saved_graph_says_what_is_there(tmp_path, capsys, monkeypatch, case, message):
    import reftgraph.models

    monkeypatch.setattr(reftgraph.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    rg.Graph().save(tmp_path / "pirate-graph")
    p = tmp_path / ("pirate-grahp" if case == "misspelled" else "thing")
    if case == "file":
        write(p, "x")
    elif case in ("empty", "other", "empty_graph", "damaged"):
        p.mkdir()
    if case == "other":
        write(p / "notes.txt", "x")
        (p / "runs").mkdir()
    elif case == "empty_graph":
        (p / "graph").mkdir()
    elif case == "damaged":
        write(p / "CURRENT", "x")
        (p / "graph").mkdir()   # not looked at: the folder itself is a (damaged) saved graph
    for command in (["generate", str(p), "--prompt", "ab"], ["show", str(p)]):
        assert main(command) == 2
        assert message.format(p=p, t=tmp_path) in one_line_error(capsys)


# -- specs as people write them -------------------------------------------------------------------

def test_numbers_written_the_short_way_are_numbers(spec):
    """PyYAML reads `lr: 6e-3` (YAML 1.1) as the string '6e-3'."""
    from reftgraph.cli.spec import read_spec

    write(spec, spec.read_text().replace("lr: 0.01", "lr: 6e-3, weight_decay: 1E-2, warmup: '5'"))
    train = read_spec(spec)["train"]
    assert train["lr"] == 0.006 and train["weight_decay"] == 0.01 and train["warmup"] == 5.0
    write(spec, spec.read_text().replace("lr: 6e-3", "lr: fast"))
    with pytest.raises(rg.SpecError, match="train.lr must be a number > 0, got 'fast'"):
        read_spec(spec)


@pytest.mark.parametrize("name, text, message", [
    ("spec.yaml", "model: x\ngraph: {layers: [1]\ndata: {path: t.jsonl}\n",
     "spec.yaml:3:1: not valid YAML: expected ',' or '}', but got '<scalar>' (in the flow mapping from line 2, "
     "column 8)"),
    ("spec.yaml", "graph:\n  layers: [1]\n   rank: 2\n", "spec.yaml:3:4: not valid YAML: expected <block end>, but "
                                                       "found '<block mapping start>' (in the block mapping from "
                                                       "line 2, column 3)"),
    ("spec.json", '{"graph": {"layers": [1]},\n "data": {"path": "t.jsonl"},}',
     "spec.json:2:30: not valid JSON: Expecting property name enclosed in double quotes"),
], ids=["yaml_flow", "yaml_indent", "json"])
def test_parse_errors_name_the_line_and_column(tmp_path, capsys, name, text, message):
    assert main(["train", str(write(tmp_path / name, text))]) == 2
    assert message in one_line_error(capsys)


# -- model names: one line, within seconds, never the network ------------------------------------

def test_a_misspelled_model_is_one_line_within_seconds(spec, capsys, monkeypatch):
    import time

    from no_network import forbid_network

    forbid_network(monkeypatch)
    write(spec, spec.read_text().replace(spec.read_text().split("model: ")[1].split()[0], "gemma-3-270"))
    start = time.perf_counter()
    assert main(["train", str(spec)]) == 2
    assert time.perf_counter() - start < 5
    err = one_line_error(capsys)
    assert "model 'gemma-3-270' cannot be loaded" in err and "did you mean 'gemma-3-270m'?" in err


# -- the hints name a command that runs ----------------------------------------------------------

def test_hints_name_the_command_of_this_environment(tmp_path, monkeypatch):
    import shutil

    from reftgraph.cli.main import command

    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    write(venv / "reftgraph", "#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)   # not on PATH: `make demo` without activating
    assert command() == ".venv/bin/reftgraph"
    monkeypatch.setattr(shutil, "which", lambda name: str(venv / "reftgraph"))   # activated
    assert command() == "reftgraph"
    write(tmp_path / "other", "#!/bin/sh\n")
    monkeypatch.setattr(shutil, "which", lambda name: str(tmp_path / "other"))   # another install on PATH
    assert command() == ".venv/bin/reftgraph"
    monkeypatch.chdir(tmp_path / ".venv")
    assert command() == "bin/reftgraph"


def test_generate_with_a_misspelled_model_says_so_once(tmp_path, capsys, monkeypatch):
    from no_network import forbid_network

    forbid_network(monkeypatch)
    folder = rg.Graph().save(tmp_path / "g")
    assert main(["generate", str(folder), "--prompt", "ab", "--model", "smolm2"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("reftgraph generate: error: model 'smolm2' cannot be loaded: it is not a folder here")
    assert "did you mean 'smollm2-135m-instruct'?" in err and err.count("smolm2'") == 1
