"""Training on 2 processes (gloo, CPU) equals training on one with the same global batch.

The jobs are in tests/distributed_job.py; each launch starts 2 fresh processes (~10 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reftgraph as rg
from reftgraph.cli import main
from reftgraph.training import latest_checkpoint
import distributed_job as job

JOB = Path(__file__).with_name("distributed_job.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(command, out: Path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)
    return done.returncode, done.stdout + done.stderr


def weights(out: Path, rank: int) -> dict:
    return load_file(str(out / f"rank-{rank}.safetensors"))


def history(out: Path, rank: int) -> list:
    return json.loads((out / f"history-{rank}.json").read_text())


def same_history(a: list, b: list):
    assert [(r["epoch"], r["step"]) for r in a] == [(r["epoch"], r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in x:
            assert y[key] == pytest.approx(x[key], abs=1e-5), key


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same job in this one process."""
    g, h = job.reft(tmp_path_factory.mktemp("single"))
    return g.ops.state_dict(), json.loads(h.to_json(orient="records"))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_train_like_one(tmp_path, single, launcher):
    prefix = TORCHRUN if launcher == "torchrun" else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    code, log = launch(prefix + [str(JOB), str(tmp_path), "train"], tmp_path)
    assert code == 0, log[-3000:]
    ref_weights, ref_history = single
    for rank in (0, 1):
        assert json.loads((tmp_path / f"world-{rank}.json").read_text()) == [rank, 2]
        got = weights(tmp_path, rank)
        for key, value in ref_weights.items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0)
        same_history(history(tmp_path, rank), ref_history)   # losses of whole batches, eval metrics
    moved = max(float((ref_weights[k] - v).abs().max()) for k, v in job.reft_init().items())
    assert moved > 1e-2   # the weights did train
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-0", "epoch-1", "epoch-2"]


def test_das_on_two_processes_learns_the_same_rotation(tmp_path):
    code, log = launch(TORCHRUN + [str(JOB), str(tmp_path), "das"], tmp_path)
    assert code == 0, log[-3000:]
    g, h = job.das(tmp_path / "single")
    op = g["r"].op
    # the same function h + Rt diag(m) Rt^T (s - h): compare Rt diag(m) Rt^T, which does not
    # see a column's sign (a near-unused column of the full rotation can come out flipped:
    # the raw entries the loss does not see differ, Adam scaling float noise in ~0 gradients)
    def projector(r):
        return r.Rt(r.dims()) * r.mask() @ r.Rt(r.dims()).T

    for rank in (0, 1):
        other = rg.Rotate(**op.config())
        other.load_state_dict({k[len("r."):]: v for k, v in weights(tmp_path, rank).items()})
        torch.testing.assert_close(projector(other), projector(op), atol=1e-4, rtol=0)
        x, s = torch.randn(4, 1, 32), torch.randn(4, 1, 32)
        torch.testing.assert_close(other(x, source=s), op(x, source=s), atol=1e-5, rtol=0)
        same_history(history(tmp_path, rank), json.loads(h.to_json(orient="records")))


def test_a_time_budget_stops_every_process_at_the_same_step(tmp_path):
    # process 0 is past its deadline at once, process 1 is not: stopping alone would leave
    # process 1 waiting in the loss's all-reduce
    code, log = launch(TORCHRUN + [str(JOB), str(tmp_path), "memorise"], tmp_path, timeout=120)
    assert code == 0, log[-3000:]
    assert [json.loads((tmp_path / f"steps-{r}.json").read_text()) for r in (0, 1)] == [0, 0]


def test_a_killed_process_leaves_the_last_checkpoint_which_resumes_in_one_process(tmp_path, single):
    code, log = launch(TORCHRUN + [str(JOB), str(tmp_path), "kill"], tmp_path)
    assert code != 0   # process 0 died writing epoch-2; torchrun stopped the other one
    ckpt = tmp_path / "ckpt"
    assert latest_checkpoint(ckpt).name == "epoch-1"
    assert all((ckpt / f"epoch-{e}" / "state.json").is_file() for e in (0, 1))
    assert not (ckpt / "epoch-2").exists()   # only a hidden temporary folder of it
    g, h = job.reft(tmp_path, resume=True)   # one process resumes the 2-process run
    ref_weights, ref_history = single
    for key, value in g.ops.state_dict().items():
        torch.testing.assert_close(value, ref_weights[key], atol=1e-5, rtol=0)
    same_history(json.loads(h.to_json(orient="records")), ref_history)


def test_the_train_command_under_torchrun(tmp_path):
    folder = tmp_path / "tiny"
    lm = rg.models.tiny("llama")
    lm.hf.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    rows = [{"prompt": p, "response": r} for p, r in job.ROWS]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(
            f"model: {folder}\ngraph: {{layers: [0, 1], positions: f1+l1, rank: 2}}\n"
            f"data: {{path: {tmp_path / 'train.jsonl'}}}\ntrain: {{epochs: 2, batch_size: 3, lr: 0.05}}\n"
            f"output: {tmp_path / name}\n")
    code, log = launch(TORCHRUN + ["-m", "reftgraph", "train", str(tmp_path / "two.yaml")], tmp_path)
    assert code == 0, log[-3000:]
    assert log.count("trainable intervention params") == 1   # printed by process 0 only
    assert main(["train", str(tmp_path / "one.yaml")]) == 0
    from reftgraph.files import current_folder

    one = load_file(str(current_folder(tmp_path / "one" / "graph") / "weights.safetensors"))
    two = load_file(str(current_folder(tmp_path / "two" / "graph") / "weights.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
