"""Training checkpoints: one folder ``epoch-N`` per epoch (graph, optimizer, schedule, random
state, history), written atomically, so a run resumes exactly from any of them.

>>> import tempfile, reftgraph as rg
>>> from pathlib import Path
>>> lm = rg.models.tiny("llama")
>>> g = rg.reft_graph(lm, layers=[1], positions="last", rank=2)
>>> d = Path(tempfile.mkdtemp())
>>> _ = rg.train(g, lm, rg.data.PromptResponse([("ab", "cd")]), epochs=2, checkpoint_dir=d, progress=False)
>>> latest_checkpoint(d).name, sorted(p.name for p in latest_checkpoint(d).iterdir())
('epoch-1', ['graph.json', 'optimizer.safetensors', 'state.json', 'weights.safetensors'])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..files.io import atomic_dir, load_weights, write_graph


def save_checkpoint(folder: Path, graph, model, optimizer, scheduler, state: dict) -> None:
    """Write one checkpoint folder atomically: graph, optimizer and schedule state, random state.

    >>> import tempfile, torch, reftgraph as rg
    >>> g = rg.reft_graph(rg.models.tiny("llama"), layers=[1], positions="last", rank=2)
    >>> opt = torch.optim.AdamW(g.parameters())
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    >>> folder = Path(tempfile.mkdtemp()) / "epoch-0"
    >>> save_checkpoint(folder, g, None, opt, sched, {"epoch": 0, "step": 1, "history": []})
    >>> sorted(p.name for p in folder.iterdir())
    ['graph.json', 'optimizer.safetensors', 'state.json', 'weights.safetensors']
    """
    with atomic_dir(folder) as tmp:
        write_graph(tmp, graph, model)
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous()
                   for i, s in opt["state"].items() for k, v in s.items()}
        tensors["rng"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda_rng.{i}"] = state
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(state, param_groups=opt["param_groups"], scheduler=scheduler.state_dict())
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    """The newest complete ``epoch-N`` folder (folders appear only once fully written).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in (1, 10, 2):
    ...     (d / f"epoch-{n}").mkdir()
    >>> latest_checkpoint(d).name, latest_checkpoint(d / "none")
    ('epoch-10', None)
    """
    folders = sorted(Path(checkpoint_dir).glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    return folders[-1] if folders else None


def checkpoint_folder(resume, checkpoint_dir) -> Optional[Path]:
    """The folder to resume from: for ``resume=True`` the newest one in ``checkpoint_dir``
    (None when there is none), for a path that folder, which must be a checkpoint.

    >>> import tempfile
    >>> checkpoint_folder(True, tempfile.mkdtemp()) is None
    True
    """
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        return latest_checkpoint(checkpoint_dir)
    folder = Path(resume)
    if not (folder / "state.json").is_file():
        found = [p.name for p in Path(folder.parent).glob("epoch-*")] if folder.parent.is_dir() else []
        raise ValueError(f"resume={str(resume)!r} is not a checkpoint folder (no state.json); "
                         f"checkpoints beside it: {sorted(found) or 'none'}")
    return folder


def load_checkpoint(folder: Path, graph, optimizer, scheduler, settings: dict) -> dict:
    """Restore a checkpoint into ``graph``, the optimizer, the schedule and torch's random
    state; returns its state (epoch, step, history). Other ``settings`` than saved raise.

    >>> import tempfile, torch, reftgraph as rg
    >>> g = rg.reft_graph(rg.models.tiny("llama"), layers=[1], positions="last", rank=2)
    >>> opt = torch.optim.AdamW(g.parameters())
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    >>> folder = Path(tempfile.mkdtemp()) / "epoch-0"
    >>> save_checkpoint(folder, g, None, opt, sched, {"epoch": 0, "step": 1, "history": [], "settings": {"lr": 1}})
    >>> load_checkpoint(folder, g, opt, sched, {"lr": 1})["step"]
    1
    """
    state = json.loads((folder / "state.json").read_text())
    saved = state.get("settings", {})
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v}
    if changed:
        raise ValueError(f"cannot resume exactly from {folder}: it was trained with other settings ("
                         + ", ".join(f"{k}={a!r}, now {b!r}" for k, (a, b) in changed.items())
                         + "); pass the same ones")
    load_weights(graph, load_file(str(folder / "weights.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_rng.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
