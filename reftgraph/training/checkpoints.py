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
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import GraphFileError
from ..files import atomic_dir, load_graph, write_graph


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


CHECKPOINT_NAME = re.compile(r"epoch-(0|[1-9][0-9]*)")


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    """The newest ``epoch-N`` folder (folders appear only once fully written); other names
    (``epoch-best``, ``epoch-3.log``, ``epoch-07``) are not checkpoints and are ignored.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("epoch-1", "epoch-10", "epoch-2", "epoch-best"):
    ...     (d / name).mkdir()
    >>> _ = (d / "epoch-30.log").write_text("notes")
    >>> latest_checkpoint(d).name, latest_checkpoint(d / "none")
    ('epoch-10', None)
    """
    folders = [p for p in Path(checkpoint_dir).glob("epoch-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]
    return max(folders, key=lambda p: int(p.name[len("epoch-"):]), default=None)


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
        raise GraphFileError(f"resume={str(resume)!r} is not a checkpoint folder (no state.json); "
                             f"checkpoints beside it: {sorted(found) or 'none'}")
    return folder


def _shares(graph) -> dict:
    """For each node, the other nodes that share its op."""
    return {n.name: sorted(m.name for m in graph.nodes if m.op is n.op and m.name != n.name) for n in graph.nodes}


def _node_differences(name: str, saved, now) -> list:
    out = []
    if saved.site != now.site:
        out.append(f"node {name!r}: site {saved.site}, now {now.site}")
    if saved.stream != now.stream:
        out.append(f"node {name!r}: stream {saved.stream!r}, now {now.stream!r}")
    a, b = type(saved.op).__name__, type(now.op).__name__
    if a != b:
        out.append(f"node {name!r}: op {a}, now {b}")
        return out
    ca, cb = saved.op.config(), now.op.config()
    changed = [f"{k}={ca.get(k)!r}, now {cb.get(k)!r}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    if changed:
        out.append(f"node {name!r}: {a} " + ", ".join(changed))
    sa, sb = ({k: list(v.shape) for k, v in op.state_dict().items()} for op in (saved.op, now.op))
    if not changed and sa != sb:
        out.append(f"node {name!r}: {a} tensors {sa}, now {sb}")
    return out


def graph_differences(saved, graph, trainable: Optional[list] = None) -> list:
    """What differs between a checkpoint's graph ``saved`` and ``graph``: node names and
    their order, sites, streams, op types and configs, shared ops and (with ``trainable``,
    the names of the checkpoint's trainable nodes) which nodes train; one line each.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> a = rg.reft_graph(lm, layers=[0], positions="last", rank=2)
    >>> b = rg.reft_graph(lm, layers=[1], positions="last", rank=4, op="DiReFT")
    >>> graph_differences(a, a)
    []
    >>> for line in graph_differences(a, b):
    ...     print(line)
    node 'L0' (LoReFT at resid_post[0] pos=last) is in the checkpoint, not in this graph
    node 'L1' (DiReFT at resid_post[1] pos=last) is in this graph, not in the checkpoint
    >>> graph_differences(a, rg.reft_graph(lm, layers=[0], positions="last", rank=4))
    ["node 'L0': LoReFT rank=2, now 4"]
    """
    old, new = {n.name: n for n in saved.nodes}, {n.name: n for n in graph.nodes}
    out = [f"node {k!r} ({type(n.op).__name__} at {n.site}) is in the checkpoint, not in this graph"
           for k, n in old.items() if k not in new]
    out += [f"node {k!r} ({type(n.op).__name__} at {n.site}) is in this graph, not in the checkpoint"
            for k, n in new.items() if k not in old]
    if out:
        return out
    if list(old) != list(new):
        out.append(f"the nodes are in another order (checkpoint: {', '.join(old)}; now: {', '.join(new)})")
    for name in old:
        out += _node_differences(name, old[name], new[name])
    a, b = _shares(saved), _shares(graph)
    out += [f"node {k!r} shares its op with {a[k] or 'no node'} in the checkpoint, now with {b[k] or 'no node'}"
            for k in old if a[k] != b[k]]
    if trainable is not None:
        now = trainable_nodes(graph)
        out += [f"node {k!r} was trained in the checkpoint, now frozen" for k in trainable if k not in now]
        out += [f"node {k!r} was frozen in the checkpoint, now trained" for k in now if k not in trainable]
    return out


def trainable_nodes(graph) -> list:
    """The names of the nodes whose op has a parameter that trains.

    >>> import reftgraph as rg
    >>> trainable_nodes(rg.reft_graph(rg.models.tiny("llama"), layers=[0, 1], positions="last").freeze())
    []
    """
    return [n.name for n in graph.nodes if any(p.requires_grad for p in n.op.parameters())]


def _read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a mapping")
        return state
    except (OSError, ValueError) as e:
        raise GraphFileError(f"{folder / 'state.json'} cannot be read ({str(e)[:200]}): not a complete "
                             "checkpoint") from None


def load_checkpoint(folder: Path, graph, optimizer, scheduler, settings: dict) -> dict:
    """Restore a checkpoint into ``graph``, the optimizer, the schedule and torch's random
    state; returns its state (epoch, step, history).

    >>> import tempfile, torch, reftgraph as rg
    >>> g = rg.reft_graph(rg.models.tiny("llama"), layers=[1], positions="last", rank=2)
    >>> opt = torch.optim.AdamW(g.parameters())
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    >>> folder = Path(tempfile.mkdtemp()) / "epoch-0"
    >>> save_checkpoint(folder, g, None, opt, sched, {"epoch": 0, "step": 1, "history": [], "settings": {"lr": 1}})
    >>> load_checkpoint(folder, g, opt, sched, {"lr": 1})["step"]
    1
    >>> other = rg.reft_graph(rg.models.tiny("llama"), layers=[1], positions="last", rank=2, op="DiReFT")
    >>> load_checkpoint(folder, other, opt, sched, {"lr": 1})    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: cannot resume from ...: it was trained with another graph (node 'L1': op ...

    A checkpoint of another graph (see :func:`graph_differences`) or other ``settings``
    raises :class:`GraphFileError`, listing the differences, before anything is loaded.
    """
    state = _read_state(folder)
    saved_graph = load_graph(folder)
    differences = graph_differences(saved_graph, graph, state.get("trainable"))
    if differences:
        raise GraphFileError(f"cannot resume from {folder}: it was trained with another graph ("
                             + "; ".join(differences) + "); build the same graph, or train into another "
                             "checkpoint folder")
    saved = state.get("settings", {})
    changed = {k: (saved[k], v) for k, v in settings.items() if k in saved and saved[k] != v}
    if changed:
        raise GraphFileError(f"cannot resume exactly from {folder}: it was trained with other settings ("
                             + ", ".join(f"{k}={a!r}, now {b!r}" for k, (a, b) in changed.items())
                             + "); pass the same ones")
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a safetensors file
        raise GraphFileError(f"{folder / 'optimizer.safetensors'} cannot be read ({type(e).__name__}: "
                             f"{str(e)[:200]}): not a complete checkpoint") from None
    opt_state = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise GraphFileError(f"cannot resume from {folder}: its optimizer state does not fit this graph's "
                             f"trainable parameters ({str(e).splitlines()[0][:200]})") from None
    ops = {n.name: n.op for n in graph.nodes}
    with torch.no_grad():
        for node in saved_graph.nodes:
            ops[node.name].load_state_dict(node.op.state_dict())
    torch.set_rng_state(tensors["rng"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_rng.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state
