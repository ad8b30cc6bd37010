"""The ``reftgraph`` command line: ``train``, ``generate``, ``show`` and ``demo``.

    reftgraph demo                       # the main job on the default model
    reftgraph train spec.yaml            # train a graph from a spec (see reftgraph.spec)
    reftgraph generate DIR --prompt "Why is the sky blue?"
    reftgraph show DIR

``DIR`` is a saved graph folder, or the ``output`` folder of ``reftgraph train`` (its graph is
in ``graph/``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..arch.models import DEFAULT_MODEL
from ..errors import GraphFileError, ReftgraphError, SpecError

__all__ = ["main", "parser"]

PATCH_BASE = "The capital of France is the city of"
PATCH_SOURCE = "The capital of Italy is the city of"


def _top(lm, logits) -> str:
    return lm.tokenizer.decode(int(logits.argmax()))


def printable(text) -> str:
    """``text`` with control and other non-printable characters escaped, so that a name read
    from a file cannot move the cursor, recolour or rewrite the terminal.

    >>> printable("red\\x1b[31m node\\u202e\\n")
    'red\\\\x1b[31m node\\\\u202e\\\\n'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def command() -> str:
    """How to run ``reftgraph`` from the user's shell, for the hints the commands print:
    ``reftgraph`` when that is on PATH, else this environment's script (``.venv/bin/reftgraph``
    after ``make setup``), else ``python -m reftgraph``.

    >>> from unittest import mock
    >>> with mock.patch("shutil.which", return_value=None), mock.patch("sys.executable", "/nowhere/bin/python"):
    ...     command()
    '/nowhere/bin/python -m reftgraph'
    """
    here = Path(sys.executable).parent / ("reftgraph.exe" if os.name == "nt" else "reftgraph")
    on_path = shutil.which("reftgraph")
    if on_path and (not here.is_file() or os.path.samefile(on_path, here)):
        return "reftgraph"
    if here.is_file():
        return shlex.quote(_relative(here))
    return f"{shlex.quote(_relative(Path(sys.executable)))} -m reftgraph"


def _relative(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it (with a ``/``), else as it is."""
    try:
        inside = Path(os.path.relpath(path))
    except ValueError:   # another drive
        return str(path)
    if inside.parts and inside.parts[0] == "..":
        return str(path)
    return str(inside) if len(inside.parts) > 1 else f".{os.sep}{inside}"


def _model_error(name: str, e: Exception) -> SpecError:
    from ..arch.hub import looks_like_path

    if looks_like_path(name) and not Path(name).expanduser().exists():
        return SpecError(f"model {name!r} does not exist (not a folder, and not a model name or a Hugging Face id)")
    return SpecError(f"model {name!r} cannot be read: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")


def _n_layers(name: str) -> int:
    """The model's number of layers, read from its config; a model that cannot be found is a SpecError."""
    from ..arch.models import config_of

    try:
        return config_of(name).num_hidden_layers
    except (OSError, ValueError) as e:
        if isinstance(e, ReftgraphError):
            raise
        raise _model_error(name, e) from None


def _load(name: str):
    """``rg.load(name)``; a model that cannot be found is a SpecError."""
    import reftgraph as rg

    try:
        return rg.load(name)
    except OSError as e:
        if isinstance(e, ReftgraphError):   # ModelNotFound says it all
            raise
        raise _model_error(name, e) from None


def _check_output(out: Path) -> None:
    """Create the output folder (and its checkpoints/) and write a file there before any
    training, so that a folder that cannot be written fails now, not after an epoch."""
    from ..files import load_graph

    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise SpecError(f"output folder {out} cannot be created or written ({e.strerror or e}); "
                        "set 'output' to a folder you can write") from None
    graph = out / "graph"
    if not (graph.exists() or graph.is_symlink()) or graph.is_dir() and not any(graph.iterdir()):
        return
    try:
        load_graph(graph)   # a saved graph is replaced by the new one; anything else would be refused
    except ReftgraphError as e:
        raise SpecError(f"{graph} exists and is not a saved graph ({printable(e)[:200]}): the trained graph would "
                        "not be saved there; remove it or set another 'output'") from None


# -- train ---------------------------------------------------------------------

def _dataset(spec: dict, key: str = "path"):
    from ..training import data
    from .spec import read_rows

    rows = read_rows(spec["data"][key])
    template = spec["data"].get("template")
    subspaces = [r.get("subspace") for r in rows] if any("subspace" in r for r in rows) else None
    if "prompt" in rows[0]:
        return data.PromptResponse([(r["prompt"], r["response"]) for r in rows], template=template,
                                   subspaces=subspaces)
    return data.Classification([r["text"] for r in rows], [r["label"] for r in rows], template=template,
                               subspaces=subspaces)


def train_cmd(args) -> int:
    import reftgraph as rg

    from ..viz.plot import plot_history
    from .spec import check_layers, read_spec
    from ..training.distributed import init, is_main
    from ..training.supervised import latest_checkpoint

    spec = read_spec(args.spec)
    dataset = _dataset(spec)
    held_out = _dataset(spec, "eval_path") if spec["data"].get("eval_path") else None  # read before the model loads
    kl_data = _dataset(spec, "kl_path") if spec["data"].get("kl_path") else None
    if kl_data is not None and not isinstance(kl_data, rg.data.PromptResponse):
        raise SpecError(f"data.kl_path {spec['data']['kl_path']}: the KL rows must be {{prompt, response}} rows")
    check_layers(spec, _n_layers(spec["model"]))
    out = Path(spec["output"])
    _check_output(out)
    lm = _load(spec["model"])
    g = rg.reft_graph(lm, **spec["graph"])
    if isinstance(dataset, rg.data.Classification):
        g.add(rg.Site("resid_post", layer=-1, positions="last"),
              rg.Classify(lm.arch.d_model, max(dataset.labels) + 1), name="classify")
    init()
    main_process = is_main()
    if main_process:
        rg.print_trainable_parameters(g, lm)
    checkpoints = out / "checkpoints"
    if args.resume and main_process and latest_checkpoint(checkpoints) is None:
        print(f"no checkpoint in {checkpoints}: starting from scratch")
    try:
        eval_fn = None
        if held_out is not None:
            keep = {k: v for k, v in spec["train"].items() if k in ("batch_size", "padding_side", "max_length")}
            eval_fn = (lambda graph, model, epoch: {"eval_loss": rg.training.evaluate(graph, model, held_out, **keep)})
        history = rg.train(g, lm, dataset, checkpoint_dir=checkpoints, resume=args.resume, eval_fn=eval_fn,
                           kl_data=kl_data, **spec["train"])
    except rg.training.NonFiniteLoss as e:
        print(f"reftgraph train: {printable(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        last = latest_checkpoint(checkpoints)
        where = f"the last complete checkpoint is {last}" if last else "no epoch finished, so no checkpoint"
        print(f"\ninterrupted: {where}. Resume with: {command()} train {args.spec} --resume", file=sys.stderr)
        return 130
    if not main_process:   # under torchrun / accelerate launch: process 0 writes the files
        return 0
    g.save(out / "graph", model=lm)
    history.to_csv(out / "history.csv", index=False)
    plot_history(history).savefig(out / "curve.png", dpi=120)
    g.draw().savefig(out / "graph.png", dpi=120)
    print(f"saved the trained graph in {printable(out / 'graph')}/ and history.csv, curve.png, graph.png "
          f"in {printable(out)}/")
    print(f"try it: {command()} generate {shlex.quote(str(out))} --prompt 'Why is the sky blue?'")
    return 0


# -- generate / show -----------------------------------------------------------

def graph_folder(path) -> Path:
    """The saved graph that ``path`` names: the folder itself, or its ``graph/`` (the
    ``output`` folder of ``reftgraph train``). Anything else is a :class:`GraphFileError`
    that says what is there.

    >>> import tempfile, reftgraph as rg
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = rg.Graph().save(out / "graph")
    >>> graph_folder(out) == out / "graph"
    True
    >>> (out / "notes").mkdir()
    >>> graph_folder(out / "notes")           # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: .../notes is not a saved graph: it is an empty folder; ...
    """
    from ..files import current_folder

    path = Path(path)
    try:
        current_folder(path)   # the checks load_graph makes first, for either layout
        return path
    except GraphFileError as e:
        error = e
    if not path.exists():
        raise GraphFileError(f"{printable(path)} does not exist{_nearest(path)}") from None
    if not path.is_dir():
        raise GraphFileError(f"{printable(path)} is a file, not a saved graph folder") from None
    if _holds_a_graph(path):
        raise error from None   # load_graph's own reason (a damaged CURRENT, a missing graph.json, ...)
    inner = path / "graph"
    if inner.is_dir():
        current_folder(inner)   # its own error, naming graph/, when that is not a saved graph
        return inner
    raise GraphFileError(f"{printable(path)} is not a saved graph: it is {_contents(path)}; a saved graph folder "
                         "holds CURRENT and versions/ (or graph.json), and the output folder of 'reftgraph train' "
                         "holds one in graph/") from None


def _holds_a_graph(path: Path) -> bool:
    """Whether ``path`` has any file of a saved graph (of either layout), so its own error is the one to show."""
    from ..files.versions import OLD_LAYOUT, POINTER, VERSIONS

    return any((path / name).exists() for name in (POINTER, VERSIONS, *OLD_LAYOUT))


def _contents(path: Path, most: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "an empty folder"
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"a folder containing {', '.join(printable(n) for n in names[:most])}{more}"


def _nearest(path: Path) -> str:
    """``"; did you mean out/pirate-graph?"`` when the parent folder holds a near name."""
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return f"; did you mean {printable(parent / near[0])}?" if near else ""


def _saved_model_name(folder: Path) -> str:
    """The model a graph was saved for; the whole folder is checked first (no model loads
    for a folder that is not a valid saved graph)."""
    import json

    from ..files import current_folder, load_graph

    load_graph(folder)
    info = json.loads((current_folder(folder) / "graph.json").read_text(encoding="utf-8"))["model"] or {}
    return info.get("name") or DEFAULT_MODEL


def generate_cmd(args) -> int:
    import reftgraph as rg

    from ..engine import check_chat_template
    from .spec import read_lines

    if not (args.prompts or args.prompt):   # the arguments first, then the files they name
        raise SpecError("give --prompt TEXT (repeatable) or --prompts FILE")
    folder = graph_folder(args.dir)
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise SpecError(f"prompts file not found: {p}")
        prompts = [line for line in read_lines(p) if line.strip()]
    else:
        prompts = args.prompt
    if not prompts:
        raise SpecError(f"the prompts file {args.prompts} holds no prompt")
    name = args.model or _saved_model_name(folder)
    lm = _load(name)
    g = rg.load_graph(folder, model=lm)
    if not args.no_template:
        check_chat_template(lm.tokenizer, name)
    kw = dict(max_new_tokens=args.max_new_tokens, template=None if args.no_template else "chat")
    plain = rg.Graph().generate(lm, prompts, **kw).texts
    steered = g.generate(lm, prompts, **kw).texts
    for p, a, b in zip(prompts, plain, steered):
        print(f"prompt: {printable(p)}\n  without graph: {a.strip()!r}\n  with graph:    {b.strip()!r}\n")
    return 0


def show_cmd(args) -> int:
    import reftgraph as rg

    folder = graph_folder(args.dir)
    g = rg.load_graph(folder)
    table = g.summary().map(lambda v: printable(v) if isinstance(v, str) else v)
    print(table.to_string(index=False))
    print(f"\n{len(g)} nodes, {g.num_parameters():,d} trainable parameters "
          f"({g.num_parameters(trainable_only=False):,d} in all)")
    png = Path(args.png) if args.png else folder / "graph.png"
    g.draw().savefig(png, dpi=120)
    print(f"picture: {printable(png)}")
    return 0


# -- demo ----------------------------------------------------------------------

def _patching_table(lm) -> None:
    import reftgraph as rg

    ids = lm.tokenizer(PATCH_BASE)["input_ids"]
    subject = next(i for i, t in enumerate(ids) if "France" in lm.tokenizer.decode(t))
    clean = rg.Graph().run(lm, [PATCH_BASE, PATCH_SOURCE]).next_token_logits
    print(f"\n1. Where does the answer live? base {PATCH_BASE!r} -> {_top(lm, clean[0])!r}, "
          f"source {PATCH_SOURCE!r} -> {_top(lm, clean[1])!r}")
    print("   Patch resid_pre from the source into the base, one layer at a time:")
    print(f"   {'layer':>5}  {'at France':>10}  {'at last token':>13}")
    for layer in range(0, lm.arch.n_layers, 3):
        row = []
        for pos in ([subject], "last"):
            g = rg.Graph()
            g.add(rg.Site("resid_pre", layer=layer, positions=pos), rg.Patch("source"))
            row.append(_top(lm, g.run(lm, PATCH_BASE, sources={"source": PATCH_SOURCE}).next_token_logits[0]))
        print(f"   {layer:>5}  {row[0]!r:>10}  {row[1]!r:>13}")


def caps_experiment(lm, layers=(10, 16), rank=4, epochs=6, lr=6e-3, examples=90, new_tokens=24,
                    progress=True) -> dict:
    """The first demo: answers in CAPITALS, no KL term (the hard case of ``docs/reft.md``).
    :func:`reftgraph.experiments.style_experiment` with ``style="caps", kl_weight=0``."""
    from ..experiments import style_experiment

    return style_experiment(lm, layers, rank, epochs, lr, examples, new_tokens, progress, style="caps",
                            kl_weight=0)


STYLE_NAMES = {"title": "Title Case", "caps": "CAPITALS"}


def demo(args) -> int:
    """The main job on the default model: a patching table (where does the model keep the
    answer?), then a LoReFT graph trained to answer in Title Case (or CAPITALS) with a KL term
    that keeps what the model knew, with the style's rate on held-out questions before and
    after and the share of facts kept; saves the graph, history, curve and picture."""
    import reftgraph as rg

    from ..experiments import style_experiment
    from ..viz.plot import plot_history

    t0 = time.time()
    out = Path(args.output)
    lm = rg.load(args.model)
    print(f"loaded {lm} in {time.time() - t0:.1f}s")
    with torch.no_grad():
        _patching_table(lm)
    style = STYLE_NAMES[args.style]
    kl = (f"; KL to the unedited model on 40 neutral facts (weight {args.kl_weight:g}, case-folded)"
          if args.kl_weight else "; no KL term")
    print(f"\n2. Teach a behaviour the model lacks: answer in {style}. LoReFT, rank {args.rank}, "
          f"layers {args.layers}, positions f5+l5, {min(args.examples, 90)} training examples, "
          f"30 held-out questions{kl}.")
    rg.print_trainable_parameters(rg.reft_graph(lm, layers=args.layers, positions="f5+l5", rank=args.rank), lm)
    r = style_experiment(lm, args.layers, args.rank, args.epochs, args.lr, args.examples, args.new_tokens,
                         style=args.style, kl_weight=args.kl_weight)
    for p, a, b in list(zip(r["prompts"], r["before"], r["after"]))[:4]:
        print(f"\n   Q: {p}\n   before: {a.strip()[:90]!r}\n   after:  {b.strip()[:90]!r}")
    h = r["history"]
    loss = f"final loss {h['loss'].iloc[-1]:.3f}" + (f", KL term {h['kl'].iloc[-1]:.3f}" if "kl" in h else "")
    print(f"\n   answers in {style} on held-out questions: before {r['rate_before']:.0%}, "
          f"after {r['rate_after']:.0%} (trained in {r['train_seconds']:.0f}s, {loss})")
    print(f"   content kept: of the {r['known']} capital-city questions the model answered right before, "
          f"{r['kept']:.0%} are still right after")
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.style}-graph"
    r["graph"].save(out / name, model=lm)
    h.to_csv(out / "history.csv", index=False)
    plot_history(h).savefig(out / "curve.png", dpi=120)
    r["graph"].draw().savefig(out / "graph.png", dpi=120)
    print(f"\nsaved the graph, history, curve and picture in {out.resolve()}/ "
          f"(try: {command()} generate {shlex.quote(str(out / name))} --prompt 'Why do we dream?')")
    print(f"done in {time.time() - t0:.0f}s")
    return 0


# -- entry point ---------------------------------------------------------------

def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _weight(text: str) -> float:
    """A finite number >= 0 (argparse type of ``--kl-weight``)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``reftgraph`` command (subcommands demo, train, generate, show).

    >>> args = parser().parse_args(["generate", "my-graph", "--prompt", "Hi?", "--max-new-tokens", "8"])
    >>> args.command, args.dir, args.prompt, args.max_new_tokens
    ('generate', 'my-graph', ['Hi?'], 8)
    """
    p = argparse.ArgumentParser(prog="reftgraph", description="Interventions on language models as a causal graph.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job on the default model: patching, then a LoReFT trained to "
                                    "answer in Title Case, keeping what the model knew", description=demo.__doc__)
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--output", default="reftgraph-demo", help="folder for the results (default: %(default)s)")
    d.add_argument("--layers", type=int, nargs="+", default=[10, 16])
    d.add_argument("--rank", type=_positive(int), default=4)
    d.add_argument("--epochs", type=_positive(int), default=6)
    d.add_argument("--lr", type=_positive(float), default=6e-3)
    d.add_argument("--examples", type=_positive(int), default=90, help="training examples (at most 90)")
    d.add_argument("--new-tokens", type=_positive(int), default=24)
    d.add_argument("--style", choices=sorted(STYLE_NAMES), default="title",
                   help="title: Title Case (default); caps: CAPITALS, the hard case (docs/reft.md)")
    d.add_argument("--kl-weight", type=_weight, default=1.0,
                   help="weight of the KL to the unedited model on neutral facts (0: none; default %(default)s)")
    d.set_defaults(func=demo)

    t = sub.add_parser("train", help="train a graph from a YAML/JSON spec")
    t.add_argument("spec", help="spec file (see reftgraph.spec)")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    t.set_defaults(func=train_cmd)

    gn = sub.add_parser("generate", help="generate with a saved graph, side by side with the plain model")
    gn.add_argument("dir", help="a saved graph folder, or the output folder of 'reftgraph train'")
    gn.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gn.add_argument("--prompts", help="a file with one prompt per line")
    gn.add_argument("--model", help="model name or path (default: the one the graph was saved for)")
    gn.add_argument("--max-new-tokens", type=_positive(int), default=48)
    gn.add_argument("--no-template", action="store_true", help="do not wrap prompts in the chat template")
    gn.set_defaults(func=generate_cmd)

    s = sub.add_parser("show", help="the node table, parameter counts and a picture of a saved graph")
    s.add_argument("dir", help="a saved graph folder, or the output folder of 'reftgraph train'")
    s.add_argument("--png", help="where to write the picture (default: DIR/graph.png)")
    s.set_defaults(func=show_cmd)
    return p


def main(argv=None) -> int:
    """Run the ``reftgraph`` command with ``argv`` (default: the process's); returns the exit status.

    >>> import tempfile, reftgraph as rg
    >>> g = rg.Graph()
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="last"), rg.Collect(), name="c")
    >>> folder = g.save(tempfile.mkdtemp() + "/g")
    >>> main(["show", str(folder)])      # doctest: +ELLIPSIS
    name      op stream  component  layer positions head subspace reads  params
       c Collect   base resid_post      1      last None     None  None       0
    <BLANKLINE>
    1 nodes, 0 trainable parameters (0 in all)
    picture: .../g/graph.png
    0

    Spec and input problems print one line on stderr and return 2.
    """
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ReftgraphError as e:
        print(f"reftgraph {args.command}: error: {printable(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
