"""The command line on a tiny model saved to a local folder."""

import json
import subprocess
import sys

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
    for name in ("graph/graph.json", "graph/weights.safetensors", "history.csv", "curve.png", "graph.png",
                 "checkpoints/epoch-1/state.json"):
        assert (out / name).is_file(), name
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


def test_spec_sections_are_the_arguments_of_reft_graph_and_train():
    import inspect

    from reftgraph.cli.spec import GraphSpec, TrainSpec
    from dataclasses import fields

    for section, fn in ((GraphSpec, rg.reft_graph), (TrainSpec, rg.train)):
        params = inspect.signature(fn).parameters
        for f in fields(section):
            assert f.name in params, f"{section.__name__}.{f.name} is not an argument of {fn.__name__}"
            assert f.default == params[f.name].default, f"{section.__name__}.{f.name}: default differs"
            assert f.metadata["help"], f"{section.__name__}.{f.name} has no help text"


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
